"""``twin-service restore BACKUP`` (docs/backup.md): the backup checked, then put in place
of the SQLite store in one rename, the database it replaced kept; refused, with the store
left exactly as it was, while anything has the store open or when the backup is unusable."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service_process import ServiceProcess, service_env
from tests.store.test_backup import backup
from tests.store.test_restore import stamped
from twin_service.store.restore_backup import RestoreInterrupted, restore_sqlite
from twin_service.store.sqlite_file_check import integrity_problem

TWIN = "org.restore:cmd"


def restore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twin_service", "restore", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=service_env({}),
    )


def desired_in(database: Path) -> object:
    conn = sqlite3.connect(database)
    try:
        (doc,) = conn.execute(
            "SELECT json_extract(doc, '$.desired') FROM twins WHERE twin_id = ?", (TWIN,)
        ).fetchone()
    finally:
        conn.close()
    return doc


def files_of(data: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(data.iterdir())}


def test_a_backup_restored_by_the_command_is_served_with_new_numbers_and_the_old_store_is_kept(
    tmp_path: Path,
) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            for n in range(3):
                assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}}).is_success
            done = backup(str(copy), "--data-dir", str(data))
            assert done.returncode == 0, done.stderr
            for n in range(3, 6):  # lost by the restore
                assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}}).is_success
            assert api.put(f"/api/v1/twins/{TWIN}-new", json={}).status_code == 201
            lost = api.get(f"/api/v1/twins/{TWIN}")
    finally:
        service.stop()

    run = restore(str(copy), "--data-dir", str(data))
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.splitlines()
    assert first == (
        f"restored 1 twins (journal up to seq 3) from {copy} to {data / 'twins.sqlite3'}"
    )
    (kept,) = data.glob("twins.sqlite3.replaced-*")
    assert second == f"the database it replaced is kept as {kept}: remove it when no longer needed"
    # The replaced database whole, its newest commits included; nothing of it beside the copy.
    assert desired_in(kept) == '{"v":5}'
    assert not (data / "twins.sqlite3-wal").exists()
    assert not list(data.glob(".twins.sqlite3.restoring-*"))
    assert stamped(data / "twins.sqlite3")
    assert copy.read_bytes() == (tmp_path / "backup.sqlite3").read_bytes()

    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            now = api.get(f"/api/v1/twins/{TWIN}")
            assert now.json()["desired"] == {"v": 2}
            assert api.get(f"/api/v1/twins/{TWIN}-new").status_code == 404
            written = api.patch(
                f"/api/v1/twins/{TWIN}",
                json={"desired": {"v": 100}},
                headers={"content-type": "application/merge-patch+json"},
            )
            assert written.json()["desiredVersion"] > lost.json()["desiredVersion"]
            assert written.headers["etag"] != lost.headers["etag"]
    finally:
        service.stop()


def test_a_restore_is_refused_while_the_service_has_the_store_open(tmp_path: Path) -> None:
    """Copied under the running service by hand, the database was replaced beneath its open
    connections: it went on serving and writing the old, unlinked file."""
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": 1}}).is_success
            assert backup(str(copy), "--data-dir", str(data)).returncode == 0
            assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": 2}}).is_success
            names = sorted(path.name for path in data.iterdir())

            run = restore(str(copy), "--data-dir", str(data))
            assert run.returncode == 1, run.stdout
            assert run.stderr == (
                f"twin-service: {data / 'twins.sqlite3'} is in use (the service, or another "
                "command, has it open): stop it, then restore\n"
            )
            assert sorted(path.name for path in data.iterdir()) == names
            assert api.get(f"/api/v1/twins/{TWIN}").json()["desired"] == {"v": 2}
            assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": 3}}).is_success
    finally:
        service.stop()
    assert desired_in(data / "twins.sqlite3") == '{"v":3}'


@pytest.fixture(scope="module")
def stopped_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose service wrote a twin and stopped."""
    data = tmp_path_factory.mktemp("stopped") / "data"
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            assert api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": 1}}).is_success
    finally:
        service.stop()
    return data


def damaged(path: Path, source: Path) -> None:
    conn = sqlite3.connect(source)
    try:
        conn.execute("VACUUM INTO ?", (str(path),))
    finally:
        conn.close()
    content = bytearray(path.read_bytes())
    content[4096:8192] = b"\xab" * 4096  # the second page: the twins table's or the schema's
    path.write_bytes(content)


def foreign(path: Path, _: Path) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, what TEXT)")
    conn.close()


def no_tables(path: Path, _: Path) -> None:
    sqlite3.connect(path).close()
    path.write_bytes(b"")


def not_a_database(path: Path, _: Path) -> None:
    path.write_bytes(b"twin,desired\n" * 400)


def a_directory(path: Path, _: Path) -> None:
    path.mkdir()


def with_a_wal(path: Path, source: Path) -> None:
    shutil.copyfile(source, path)
    path.with_name(path.name + "-wal").write_bytes(b"\0" * 4096)


@pytest.mark.parametrize(
    ("make", "status", "said"),
    [
        (damaged, 1, "fails its check (PRAGMA quick_check: "),
        (foreign, 2, "is not a backup of a twin store (its tables: events)"),
        (no_tables, 2, "is not a backup of a twin store (it has no tables)"),
        (not_a_database, 1, "file is not a database"),
        (a_directory, 1, "is not a regular file"),
        (None, 1, "does not exist"),
        (with_a_wal, 1, "lies beside the backup, with commits the file alone does not hold"),
    ],
    ids=lambda value: getattr(value, "__name__", None) or ("missing" if value is None else None),
)
def test_an_unusable_backup_is_refused_and_the_store_left_as_it_was(
    tmp_path: Path, stopped_store: Path, make: object, status: int, said: str
) -> None:
    data, given = tmp_path / "data", tmp_path / "given.sqlite3"
    shutil.copytree(stopped_store, data)
    before = files_of(data)
    if callable(make):
        make(given, data / "twins.sqlite3")
    run = restore(str(given), "--data-dir", str(data))
    assert run.returncode == status, run.stdout
    (line,) = run.stderr.splitlines()
    assert line.startswith("twin-service: ") and said in line, run.stderr
    assert files_of(data) == before


def test_the_store_itself_is_refused_however_named(tmp_path: Path, stopped_store: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(stopped_store, data)
    before = files_of(data)
    run = restore(str(data / ".." / "data" / "twins.sqlite3"), "--data-dir", str(data))
    assert run.returncode == 2
    assert "is the twin store itself" in run.stderr
    assert files_of(data) == before


def test_a_file_the_restore_cannot_use_is_named_not_the_backup(
    tmp_path: Path, stopped_store: Path
) -> None:
    """``cannot restore BACKUP: Not a directory`` (or ``Permission denied``) sent the
    operator to the backup, which was fine: the data directory was not."""
    copy, blocker = tmp_path / "backup.sqlite3", tmp_path / "a-file"
    assert backup(str(copy), "--data-dir", str(stopped_store)).returncode == 0
    blocker.write_text("")
    run = restore(str(copy), "--data-dir", str(blocker / "data"))
    assert run.returncode == 1
    assert run.stderr == (
        f"twin-service: cannot restore {copy}: {blocker / 'data' / 'twins.sqlite3'}: "
        "Not a directory\n"
    )


def test_a_copy_of_a_stopped_store_is_stamped_so_its_numbers_jump_too(
    tmp_path: Path, stopped_store: Path
) -> None:
    """``cp`` of a stopped database is no `twin-service backup`: put back by hand, the
    service went on from its numbers, handing out again those written after the copy."""
    data, cold = tmp_path / "data", tmp_path / "cold.sqlite3"
    shutil.copytree(stopped_store, data)
    shutil.copyfile(data / "twins.sqlite3", cold)
    assert not stamped(cold)
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            for n in range(2, 5):
                lost = api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": n}})
    finally:
        service.stop()

    assert restore(str(cold), "--data-dir", str(data)).returncode == 0
    assert not stamped(cold)  # the copy put in place is stamped, never the file given
    service = ServiceProcess(data).start()
    try:
        with service.client() as api:
            after = api.put(f"/api/v1/twins/{TWIN}", json={"desired": {"v": 100}})
            assert after.json()["desiredVersion"] > lost.json()["desiredVersion"]
    finally:
        service.stop()


def test_a_backup_restored_into_an_empty_data_directory_needs_nothing_kept(
    tmp_path: Path, stopped_store: Path
) -> None:
    copy, data = tmp_path / "backup.sqlite3", tmp_path / "new" / "data"
    assert backup(str(copy), "--data-dir", str(stopped_store)).returncode == 0
    run = restore(str(copy), "--data-dir", str(data))
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 1
    assert [path.name for path in data.iterdir()] == ["twins.sqlite3"]
    assert desired_in(data / "twins.sqlite3") == '{"v":1}'


def test_the_wal_of_a_removed_database_is_kept_not_replayed_onto_the_restored_one(
    tmp_path: Path, stopped_store: Path
) -> None:
    """A data directory whose database was removed (``rm twins.sqlite3`` after a crash) but
    whose ``-wal`` stayed: the restore left the ``-wal`` beside the copy, and SQLite replayed
    the lost database's commits onto it (a malformed store, or the wrong twins served as the
    backup's, its stamp overwritten)."""
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    shutil.copytree(stopped_store, data)
    assert backup(str(copy), "--data-dir", str(data)).returncode == 0
    database = data / "twins.sqlite3"
    conn = sqlite3.connect(database)
    try:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        with conn:
            conn.execute("UPDATE twins SET doc = json_set(doc, '$.desired.v', 2)")
        wal = (data / "twins.sqlite3-wal").read_bytes()
    finally:
        conn.close()
    database.unlink()
    (data / "twins.sqlite3-wal").write_bytes(wal)
    run = restore(str(copy), "--data-dir", str(data))
    assert run.returncode == 0, run.stderr
    with contextlib.closing(sqlite3.connect(database)) as restored:
        assert integrity_problem(restored) is None
    assert desired_in(database) == '{"v":1}'
    (kept,) = data.glob("twins.sqlite3.replaced-*-wal")
    assert kept.read_bytes() == wal
    assert f"kept as {str(kept).removesuffix('-wal')}-*" in run.stdout


def stop_after(point: int, asked: itertools.count[int]) -> bool:
    return next(asked) > point


def test_a_restore_stopped_at_any_point_before_the_rename_changes_nothing(
    tmp_path: Path, stopped_store: Path
) -> None:
    """A signal arriving while the copy is made or checked: at each of the points the
    restore asks whether to stop, in turn, until it is asked no more and completes."""
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    shutil.copytree(stopped_store, data)
    assert backup(str(copy), "--data-dir", str(data)).returncode == 0
    before = files_of(data)
    for point in range(100):
        stopped = functools.partial(stop_after, point, itertools.count(1))
        try:
            restore_sqlite(copy, data / "twins.sqlite3", stopped=stopped)
        except RestoreInterrupted:
            assert files_of(data) == before, point
        else:
            break
    assert point >= 2, "asked before the copy, and before the rename"
    assert desired_in(data / "twins.sqlite3") == '{"v":1}'
    assert list(data.glob("twins.sqlite3.replaced-*"))


def test_two_restores_within_a_second_keep_both_databases_they_replaced(
    tmp_path: Path, stopped_store: Path
) -> None:
    """Both kept the replaced database under one name: the second's rename replaced the
    first's, the original database with its writes after the backup lost."""
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    shutil.copytree(stopped_store, data)
    assert backup(str(copy), "--data-dir", str(data)).returncode == 0
    original = (data / "twins.sqlite3").read_bytes()
    moment = 1_796_000_000.0
    first = restore_sqlite(copy, data / "twins.sqlite3", now=lambda: moment)
    second = restore_sqlite(copy, data / "twins.sqlite3", now=lambda: moment)
    assert first.kept is not None and second.kept is not None
    assert first.kept != second.kept
    assert first.kept.read_bytes() == original


def test_a_restore_while_another_runs_into_the_same_directory_is_refused(
    tmp_path: Path, stopped_store: Path
) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup.sqlite3"
    shutil.copytree(stopped_store, data)
    assert backup(str(copy), "--data-dir", str(data)).returncode == 0
    before = files_of(data)
    held = os.open(data, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running restore holds
        run = restore(str(copy), "--data-dir", str(data))
    finally:
        os.close(held)
    assert run.returncode == 1
    assert run.stderr == f"twin-service: another restore into {data} is running\n"
    assert files_of(data) == before


def test_a_check_stopped_by_its_caller_is_no_finding_about_the_file(
    tmp_path: Path, stopped_store: Path
) -> None:
    """A SIGTERM during the restore's quick_check was reported as a damaged backup (exit 1,
    "fails its check (PRAGMA quick_check: interrupted)"), not as the interruption it was."""
    conn = sqlite3.connect(stopped_store / "twins.sqlite3")
    try:
        conn.set_progress_handler(lambda: 1, 1)
        with pytest.raises(sqlite3.OperationalError, match="interrupted"):
            integrity_problem(conn)
    finally:
        conn.close()
