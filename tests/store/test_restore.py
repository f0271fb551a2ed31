"""A SQLite backup put back in place of the database (docs/backup.md): the numbers the
service hands out afterwards are all new, so no reader, cache or device mistakes a state of
the restored database for one of the lost database's."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.service_process import ServiceProcess
from tests.store.test_backup import backup
from tests.streams.test_sse import read_events
from tests.test_command_failures import assert_cannot_start, serve
from twin_service.store.restore import EPOCH, MAX_WRITES_PER_SECOND, restore_floor

TWIN = "org.restore:t"


def restore(copy: Path, data: Path) -> None:
    """What docs/backup.md says: the copy in place of the database, its -wal and -shm gone."""
    shutil.copyfile(copy, data / "twins.sqlite3")
    for suffix in ("-wal", "-shm"):
        (data / f"twins.sqlite3{suffix}").unlink(missing_ok=True)


def stamped(database: Path) -> bool:
    conn = sqlite3.connect(database)
    try:
        return conn.execute("SELECT 1 FROM meta WHERE key = 'backup_time'").fetchone() is not None
    finally:
        conn.close()


def test_after_a_restore_no_seq_revision_or_desired_version_is_handed_out_twice(
    tmp_path: Path,
) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            for n in range(5):
                assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}}).is_success
            done = backup(str(copy), "--data-dir", str(data))
            assert done.returncode == 0, done.stderr
            # What a reader, a cache and a device saw of the database that will be lost.
            for n in range(5, 10):
                written = api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}})
                assert written.is_success
            seen_seq = int(written.headers["x-twin-seq"])
            lost = api.get(f"/api/v1/twins/{TWIN}")
            lost_etag, lost_version = lost.headers["etag"], lost.json()["desiredVersion"]
    finally:
        service.stop()
    # The backup itself is stamped; the live database never was.
    assert stamped(copy)
    assert not stamped(data / "twins.sqlite3")

    restore(copy, data)
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            for n in range(100, 105):  # as many writes as were lost, and then some
                written = api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}})
                assert written.is_success
            assert int(written.headers["x-twin-seq"]) > seen_seq
            now = api.get(f"/api/v1/twins/{TWIN}")
            assert now.json()["desired"] == {"v": 104}
            assert now.json()["desiredVersion"] > lost_version
            # A cache holding the lost state is told it changed.
            cached = api.get(f"/api/v1/twins/{TWIN}", headers={"If-None-Match": lost_etag})
            assert cached.status_code == 200, (lost_etag, cached.headers)
            # A reader resuming where it was in the lost database is told to reload.
            params = {"since": seen_seq}
            with api.stream("GET", "/api/v1/stream/twins", params=params) as stream:
                (first,) = read_events(stream, 1)
            assert first["event"] == "resync.required", first
            # The journal goes on after the restore: a reader resuming from it misses nothing.
            params = {"since": int(written.headers["x-twin-seq"]) - 1, "fields": "desired"}
            with api.stream("GET", "/api/v1/stream/twins", params=params) as stream:
                subscribed, last = read_events(stream, 2)
            assert subscribed["event"] == "subscribed", subscribed
            assert last["event"] == "event" and last["data"]["twin"] == {"desired": {"v": 104}}
    finally:
        service.stop()
    log = service.log_path.read_text(errors="replace")
    assert log.count("restored from a backup") == 1, log
    assert not stamped(data / "twins.sqlite3")

    # A second start is no restore: the numbers go on from where they are.
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            again = api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": 105}})
            assert int(again.headers["x-twin-seq"]) == int(written.headers["x-twin-seq"]) + 1
    finally:
        service.stop()
    assert "restored from a backup" not in service.log_path.read_text(errors="replace")


def test_a_damaged_backup_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """8 KiB overwritten in the middle of a backup (a bad disk, a torn copy): the service
    started on it, renumbered it and answered reads and writes on a malformed database."""
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            # Mostly older events, which a start does not read: the middle of the file is
            # theirs, and only the check finds the damage.
            for n in range(15):
                for i in range(40):
                    body = {"desired": {"v": n, "note": "x" * 500}}
                    assert api.put(f"/api/v1/twins/{TWIN}{i}", json=body).is_success
            done = backup(str(copy), "--data-dir", str(data))
            assert done.returncode == 0, done.stderr
    finally:
        service.stop()
    damaged = bytearray(copy.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 8192] = b"\xab" * 8192
    copy.write_bytes(damaged)
    with contextlib.closing(sqlite3.connect(copy)) as conn, contextlib.suppress(sqlite3.Error):
        assert conn.execute("PRAGMA quick_check").fetchone() != ("ok",)  # or it raises
    restore(copy, data)

    run = serve(tmp_path, "serve", "--data-dir", "data")
    assert_cannot_start(
        run,
        "twin-service cannot start: The twin store cannot open data/twins.sqlite3: "
        "it was restored from a backup that fails its check (PRAGMA quick_check: ",
        "docs/backup.md",
    )
    assert (data / "twins.sqlite3").read_bytes() == damaged
    assert stamped(copy)


@pytest.mark.parametrize(
    ("now", "floor"),
    [
        (EPOCH, 2**32),  # at the epoch: still more than any burst of writes
        (EPOCH + 0.2, 2**32 + 1_000_000),  # a started second counts whole
        (EPOCH + 3600, 2**32 + 3600 * 1_000_000),
        (EPOCH - 10, 2**32),  # a clock before the epoch never lowers it
    ],
)
def test_the_floor_grows_with_time(now: float, floor: int) -> None:
    assert restore_floor(now) == floor


def test_the_floor_passes_every_number_a_restored_database_can_hand_out_until_then() -> None:
    first, second = EPOCH + 86_400.0, EPOCH + 2 * 86_400.0
    # The most the first restored database can have handed out before the second restore.
    handed_out = restore_floor(first) + int(second - first) * MAX_WRITES_PER_SECOND
    assert restore_floor(second) >= handed_out
    # Centuries of restores keep the numbers exact for JSON readers.
    assert restore_floor(EPOCH + 280 * 365.25 * 86_400) < 2**53


def create_and_patch_three_times(api: httpx.Client, twin_id: str, first: int) -> httpx.Response:
    """PUT ``twin_id`` anew, then PATCH its desired ``fan`` to ``first`` and the next two
    numbers; the twin as a GET then answers."""
    merge = {"Content-Type": "application/merge-patch+json"}
    assert api.put(f"/api/v1/twins/{twin_id}", json={"desired": {"fan": 1}}).is_success
    for n in range(3):
        body = {"desired": {"fan": first + n}}
        assert api.patch(f"/api/v1/twins/{twin_id}", json=body, headers=merge).is_success
    return api.get(f"/api/v1/twins/{twin_id}")


def test_a_twin_only_the_lost_database_had_starts_above_its_numbers_when_created_again(
    tmp_path: Path,
) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    new = "org.restore:new"
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": 0}}).is_success
            done = backup(str(copy), "--data-dir", str(data))
            assert done.returncode == 0, done.stderr
            # Created after the backup: only the lost database has it.
            lost = create_and_patch_three_times(api, new, 10)
    finally:
        service.stop()
    restore(copy, data)
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            again = create_and_patch_three_times(api, new, 50)
            for key in ("revision", "desiredVersion", "reportedVersion"):
                assert again.json()[key] > lost.json()[key], (key, again.json(), lost.json())
            # A cache holding the lost twin's state is told it changed.
            cached = api.get(
                f"/api/v1/twins/{new}", headers={"If-None-Match": lost.headers["etag"]}
            )
            assert cached.status_code == 200, (lost.headers["etag"], cached.headers)
            # A twin never seen is still unknown: the floor is no tombstone.
            assert api.get("/api/v1/twins/org.restore:never/history").status_code == 404
    finally:
        service.stop()


def test_going_back_to_an_older_backup_after_two_restores_passes_every_number(
    tmp_path: Path,
) -> None:
    data, older, newer = tmp_path / "data", tmp_path / "z.sqlite3", tmp_path / "w.sqlite3"
    seen: dict[str, int] = {}

    def write(n: int, copy: Path | None = None) -> None:
        """Start the service, write (and see) one change, back up to ``copy``, stop."""
        service = ServiceProcess(data).start()
        try:
            with service.client() as api:
                written = api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}})
                assert written.is_success
                got = api.get(f"/api/v1/twins/{TWIN}").json()
                seen.update(seq=int(written.headers["x-twin-seq"]), **got)
                if copy is not None:
                    done = backup(str(copy), "--data-dir", str(data))
                    assert done.returncode == 0, done.stderr
        finally:
            service.stop()

    write(0, older)  # Z
    restore(older, data)
    write(1, newer)  # W: a backup of the restored database
    restore(newer, data)
    write(2)  # what a reader, a cache and a device saw last
    lost = dict(seen)
    restore(older, data)  # back to Z, older than W's lineage
    write(3)
    for key in ("seq", "revision", "desiredVersion"):
        assert seen[key] > lost[key], (key, seen, lost)


def test_history_across_a_restore_pages_on_and_answers_gone_only_for_pruned_events(
    tmp_path: Path,
) -> None:
    """The restore renumbers each twin's latest event to the floor and leaves the older ones
    as they were: an id's revisions then have a gap, and a twin created afterwards starts
    past the floor. Neither is history the journal lost: history and ``?at=`` answer it as
    retained, not 410."""
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    new, once = "org.restore:new", "org.restore:once"
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            for n in range(3):
                assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}}).is_success
            assert api.put(f"/api/v1/twins/{once}", json={"desired": {"v": 0}}).is_success
            done = backup(str(copy), "--data-dir", str(data))
            assert done.returncode == 0, done.stderr
    finally:
        service.stop()
    restore(copy, data)
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            # Created once before the backup: its creation, its only event, was renumbered
            # to the floor, and is still the whole of its history.
            created = api.get(f"/api/v1/twins/{once}/history", params={"since": 1})
            assert created.status_code == 200, created.text
            assert [e["action"] for e in created.json()["items"]] == ["created"]
            assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": 3}}).is_success
            history = f"/api/v1/twins/{TWIN}/history"
            every = [e["revision"] for e in api.get(history).json()["items"]]
            floor = every[2]
            assert every == [1, 2, floor, floor + 1], every
            paged, since = [], 0
            while True:
                page = api.get(history, params={"since": since, "limit": 2})
                assert page.status_code == 200, (since, page.text)
                paged += [e["revision"] for e in page.json()["items"]]
                if "nextSince" not in page.json():
                    break
                since = page.json()["nextSince"]
            assert paged == every
            # Inside the gap: a revision the twin never had in this database.
            at = api.get(f"/api/v1/twins/{TWIN}", params={"at": 3})
            assert at.status_code == 404 and at.json()["error"] == "revision.notfound", at.text
            assert api.get(f"/api/v1/twins/{TWIN}", params={"at": 2}).json()["desired"] == {"v": 1}

            # Created after the restore: its whole history is retained, from past the floor.
            assert api.put(f"/api/v1/twins/{new}", json={"desired": {"v": 1}}).is_success
            assert api.put(f"/api/v1/twins/{new}", json={"desired": {"v": 2}}).is_success
            since_one = api.get(f"/api/v1/twins/{new}/history", params={"since": 1})
            assert since_one.status_code == 200, since_one.text
            assert len(since_one.json()["items"]) == 2
            at = api.get(f"/api/v1/twins/{new}", params={"at": 1})
            assert at.status_code == 404 and at.json()["error"] == "revision.notfound", at.text
    finally:
        service.stop()
    # Pruned since: the history before what the journal keeps is gone, gap or not.
    service = ServiceProcess(data, env={"TWIN_STREAM__JOURNAL_MAX_PER_TWIN": "2"}).start()
    try:
        with service.client() as api:
            for n in range(63):  # to the floor's next multiple of 64, where pruning runs
                assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}}).is_success
            retained = [e["revision"] for e in api.get(history).json()["items"]]
            assert retained[0] > floor + 1, retained
            for since in (1, 3, floor, retained[0] - 1):
                gone = api.get(history, params={"since": since})
                assert gone.status_code == 410, (since, gone.text)
                assert gone.json()["oldestRevision"] == retained[0]
            for at in (2, 3, floor + 1):
                gone = api.get(f"/api/v1/twins/{TWIN}", params={"at": at})
                assert gone.status_code == 410, (at, gone.text)
    finally:
        service.stop()
