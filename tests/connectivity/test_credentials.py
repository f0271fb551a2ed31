"""Credential store: $7$ hashes that real mosquitto and the embedded broker both accept."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
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


def _owner_mosquitto_could_have() -> tuple[int, int]:
    """A uid and gid other than root's when running as root (the `mosquitto` user's when
    there is one); else our own uid and a group we belong to, all that we may give."""
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("mosquitto")
        except KeyError:
            return 65534, 65534
        return entry.pw_uid, entry.pw_gid
    groups = [g for g in os.getgroups() if g != os.getegid()] or [os.getegid()]
    return os.geteuid(), groups[0]


def test_a_new_export_keeps_the_owner_group_and_mode_of_the_files_it_replaces(
    tmp_path: Path,
) -> None:
    """mosquitto drops from root to its own user before it reads these files: the admin made
    them readable to it, and an export as root replaced them with root's 0600 ones, so the
    next SIGHUP left every device out ("Error opening password file", then Not authorized)."""
    store = CredentialStore(tmp_path / "creds.json")
    store.add(TWIN)
    files = tmp_path / "passwd", tmp_path / "acl", tmp_path / "service.passwd"

    def export() -> None:
        store.write_mosquitto_files(
            *files[:2], "svc", "t/{twinId}", service_password="pw", service_password_path=files[2]
        )

    export()
    uid, gid = _owner_mosquitto_could_have()
    for path in files:
        os.chown(path, uid, gid)
        path.chmod(0o640)
    store.add(OTHER)
    export()
    for path in files:
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, uid, gid), path
    assert mqtt_username(OTHER) in files[0].read_text()
    # The credentials file keeps its ownership the same way; a new file is 0600.
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    store.path.chmod(0o640)
    store.rotate(OTHER)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o640


def _mosquitto_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


@pytest.mark.skipif(
    os.geteuid() != 0 or _mosquitto_user() is None,
    reason="needs root and a mosquitto user, as deploy/mosquitto/README.md runs them",
)
async def test_mosquitto_running_as_its_user_reads_the_files_after_every_export(
    unique_name: str,
) -> None:
    """deploy/mosquitto/README.md steps 2-3 as written: export as root, give the files to
    mosquitto once, then add a device, export again and SIGHUP. The second export made the
    files root's 0600 again: mosquitto logged "Error opening password file" and refused
    every device, "Not authorized"."""
    user = _mosquitto_user()
    assert user is not None
    etc = Path(tempfile.mkdtemp())  # under /tmp: mosquitto, once itself, must reach the files
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, etc)
        etc.chmod(0o755)
        store = CredentialStore(etc / "creds.json")
        first = store.add(TWIN)
        pwfile, aclfile = etc / "twin-service.passwd", etc / "twin-service.acl"
        store.write_mosquitto_files(pwfile, aclfile, "service", "twins/{twinId}")
        for path in (pwfile, aclfile):  # the README's one-time step after the first export
            os.chown(path, user.pw_uid, user.pw_gid)
        workdir = etc / "broker"  # its log and persistence, which it writes as mosquitto
        (workdir / "persistence").mkdir(parents=True)
        for path in (workdir, workdir / "persistence"):
            os.chown(path, user.pw_uid, user.pw_gid)
        broker = Mosquitto(
            workdir,
            binary=find_binary(),
            password_file=pwfile,
            acl_file=aclfile,
            run_as="mosquitto",
        )
        stack.callback(broker.stop)
        broker.start()
        dev = await started(broker.url, unique_name, username=mqtt_username(TWIN), password=first)
        await dev.stop()
        second = store.add(OTHER)
        store.write_mosquitto_files(pwfile, aclfile, "service", "twins/{twinId}")
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGHUP)
        for twin, password in ((OTHER, second), (TWIN, first)):
            dev = await started(
                broker.url, f"{unique_name}-{twin}", username=mqtt_username(twin), password=password
            )
            await dev.stop()
        assert "Error" not in broker.log_path.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a file another user replaces")
def test_an_export_that_cannot_give_the_old_owner_refuses_and_changes_nothing() -> None:
    """A user who may replace a file of another owner, but not give the new one that owner,
    would leave mosquitto a file it cannot read: it is told, and every file stays."""
    work = Path(tempfile.mkdtemp())
    try:
        work.chmod(0o777)  # the other user may create and rename files here
        store = CredentialStore(work / "creds.json")
        store.add(TWIN)
        pwfile, acl = work / "passwd", work / "acl"
        store.write_mosquitto_files(pwfile, acl, "svc", "t/{twinId}")
        before = pwfile.read_text(), acl.read_text()
        for path in (store.path, pwfile, acl):
            path.chmod(0o644)
        os.chown(acl, 0, 0)
        os.chown(pwfile, 0, 0)
        # A forked child as nobody: it has our modules already (the interpreter is root's).
        with multiprocessing.get_context("fork").Pool(1) as pool:
            message = pool.apply(_export_as_nobody, (store.path, pwfile, acl))
        assert message.startswith(f"cannot write {pwfile}: ") and "root" in message, message
        assert (pwfile.read_text(), acl.read_text()) == before
        assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]
    finally:
        shutil.rmtree(work)


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


def _export_as_nobody(creds: Path, pwfile: Path, acl: Path) -> str:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
    try:
        CredentialStore(creds).write_mosquitto_files(pwfile, acl, "svc", "t/{twinId}")
    except CredentialError as exc:
        return str(exc)
    return "written"


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
