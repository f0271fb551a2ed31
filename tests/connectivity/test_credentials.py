"""Credential store: $7$ hashes that real mosquitto and the embedded broker both accept."""

from __future__ import annotations

import multiprocessing
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from threading import Barrier as BarrierType

import pytest

from connectivity.credentials import (
    CredentialError,
    CredentialStore,
    hash_password,
    mqtt_username,
    twin_id_from_username,
    verify_password,
)
from connectivity.errors import Refused
from tests.connectivity.helpers import Collector, assert_refused, started
from tests.servers.mosquitto import Mosquitto, find_binary

TWIN = "org.acme:pump-1"
OTHER = "org.acme:pump-2"


def test_store_add_rotate_remove_list(tmp_path: Path) -> None:
    store = CredentialStore.in_data_dir(tmp_path / "data")
    pw = store.add(TWIN)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert pw not in store.path.read_text()
    assert store.verify(TWIN, pw) and store.verify(mqtt_username(TWIN), pw)
    assert not store.verify(TWIN, pw + "x") and not store.verify(OTHER, pw)
    with pytest.raises(CredentialError):
        store.add(TWIN)
    new = store.rotate(TWIN)
    assert store.verify(TWIN, new) and not store.verify(TWIN, pw)
    assert [c.twin_id for c in store.list()] == [TWIN]
    assert store.list()[0].rotated is not None
    assert store.remove(TWIN) and not store.remove(TWIN)
    assert store.list() == []
    with pytest.raises(CredentialError):
        store.add("bad/id")


@pytest.mark.parametrize("twin_id", [TWIN, "a%3Ab:c", "plain", "x:y:z"])
def test_username_round_trip(twin_id: str) -> None:
    username = mqtt_username(twin_id)
    assert ":" not in username
    assert twin_id_from_username(username) == twin_id


def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    assert verify_password("pw", hash_password("pw"))
    assert not verify_password("pw", "$6$abc$def")
    tool = find_binary("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    path = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", path, "u", "s3cret"], check=True, capture_output=True)
    encoded = path.read_text().strip().split(":", 1)[1]
    assert encoded.startswith("$7$")
    assert verify_password("s3cret", encoded) and not verify_password("other", encoded)


async def test_mosquitto_accepts_our_hashes_and_enforces_acl(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, unique_name: str
) -> None:
    store = CredentialStore(tmp_path / "creds.json")
    pw1, pw2 = store.add(TWIN), store.add(OTHER)
    pwfile, aclfile = tmp_path / "passwd", tmp_path / "acl"
    store.write_mosquitto_files(
        pwfile, aclfile, "service", "twins/{twinId}", service_password="svc"
    )
    assert stat.S_IMODE(pwfile.stat().st_mode) == 0o600
    broker = mosquitto_factory(password_file=pwfile, acl_file=aclfile)

    svc = await started(broker.url, f"{unique_name}-svc", username="service", password="svc")
    dev = await started(broker.url, unique_name, username=mqtt_username(TWIN), password=pw1)
    for bad in ({"username": mqtt_username(TWIN), "password": pw2}, {}):
        await assert_refused(broker.url, f"{unique_name}-bad", **bad)

    got = Collector()
    await svc.subscribe("twins/#", 1, got)
    with pytest.raises(Refused):  # MQTT 5: PUBACK "Not authorized", and not delivered
        await dev.publish(f"twins/{OTHER}/reported/update", b"spoof")
    # Its own topics that the service does not read: refused as well, so a device cannot
    # retain there (hold the broker's memory) or clear the retained delta kept for it.
    for suffix in ("delta", "reported/update/accepted", "junk/1"):
        with pytest.raises(Refused):
            await dev.publish(f"twins/{TWIN}/{suffix}", b"x", retain=True)
    for suffix in ("reported/update", "live/update", "get", "status"):
        await dev.publish(f"twins/{TWIN}/{suffix}", suffix.encode())
    msgs = await got.wait_for(4)  # in order: anything refused would have come first
    assert [m.payload for m in msgs] == [b"reported/update", b"live/update", b"get", b"status"]
    # mosquitto 2.0 grants the SUBACK but never delivers what the ACL forbids to read.
    snoop, own = Collector(), Collector()
    await dev.subscribe(f"twins/{OTHER}/#", 1, snoop)
    await dev.subscribe(f"twins/{TWIN}/delta", 1, own)
    await svc.publish(f"twins/{OTHER}/delta", b"secret")
    await svc.publish(f"twins/{TWIN}/delta", b"yours")
    await own.wait_for(1)
    assert snoop.messages == []
    await dev.stop()
    await svc.stop()


def test_the_service_password_can_go_to_a_file_of_its_own(tmp_path: Path) -> None:
    """For the shipped mosquitto's service listener: the service account alone in its file,
    the devices alone in theirs; without the service's password there is nothing to write."""
    store = CredentialStore(tmp_path / "creds.json")
    device_pw = store.add(TWIN)
    files = tmp_path / "passwd", tmp_path / "acl", tmp_path / "service.passwd"
    with pytest.raises(CredentialError):
        store.write_mosquitto_files(*files[:2], "svc", "t/{twinId}", service_password_path=files[2])
    assert not files[2].exists()
    store.write_mosquitto_files(
        *files[:2], "svc", "t/{twinId}", service_password="pw", service_password_path=files[2]
    )
    assert stat.S_IMODE(files[2].stat().st_mode) == 0o600
    (service_line,) = files[2].read_text().splitlines()
    user, encoded = service_line.split(":", 1)
    assert user == "svc" and verify_password("pw", encoded)
    (device_line,) = files[0].read_text().splitlines()
    user, encoded = device_line.split(":", 1)
    assert user == mqtt_username(TWIN) and verify_password(device_pw, encoded)


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("a:b", "pw"),
        ("a b", "pw"),
        ("", "pw"),
        ("#a", "pw"),
        ("svc", ""),
        (mqtt_username("org.acme:pump-9"), "pw"),  # a device's username
    ],
)
def test_mosquitto_files_refuse_a_service_account_mosquitto_cannot_use(
    tmp_path: Path, user: str, password: str
) -> None:
    """Library callers too: the user splits or comments out its lines, the password is empty."""
    store = CredentialStore(tmp_path / "creds.json")
    store.add(TWIN)
    with pytest.raises(CredentialError):
        store.write_mosquitto_files(
            tmp_path / "pw", tmp_path / "acl", user, "t/{twinId}", service_password=password
        )
    assert not (tmp_path / "pw").exists() and not (tmp_path / "acl").exists()


def _add_and_rotate(path: Path, twin_id: str, start: BarrierType) -> tuple[str, str]:
    store = CredentialStore(path)
    start.wait()
    added = store.add(twin_id)
    return added, store.rotate(twin_id)


def test_concurrent_changes_from_several_processes_are_all_kept(tmp_path: Path) -> None:
    """Each process read the file, changed it and replaced it: the last replace dropped
    the others' devices, though every process had printed a password."""
    path = tmp_path / "data" / "device-credentials.json"
    CredentialStore(path).add("org.acme:first")
    twins = [f"org.acme:c{i}" for i in range(16)]
    with multiprocessing.Manager() as manager:
        start = manager.Barrier(len(twins))
        with multiprocessing.get_context("spawn").Pool(len(twins)) as pool:
            passwords = pool.starmap(_add_and_rotate, [(path, t, start) for t in twins])
    store = CredentialStore(path)
    assert [c.twin_id for c in store.list()] == sorted(["org.acme:first", *twins])
    for twin, (added, rotated) in zip(twins, passwords, strict=True):
        assert store.verify(twin, rotated) and not store.verify(twin, added), twin
    assert all(c.rotated is not None for c in store.list() if c.twin_id != "org.acme:first")
