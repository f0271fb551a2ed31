"""``twin-service backup``: a consistent copy of the SQLite store taken while the service
writes, restorable by putting it in place of the database (docs/backup.md)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service_process import ServiceProcess, service_env

TWINS = 40


def backup(*args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twin_service", "backup", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=service_env(settings),
    )


def test_a_backup_taken_while_twins_change_restores_every_write_acknowledged_before_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "live"
    copy = tmp_path / "backup.sqlite3"
    live = ServiceProcess(data).start()
    acknowledged: dict[str, int] = {}  # twin -> revision acknowledged before the backup began

    async def write_on(api: httpx.AsyncClient, twin: str, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            response = await api.put(f"/api/v1/twins/{twin}/desired/n", json=n)
            assert response.status_code in (201, 204), response.text

    async def run() -> subprocess.CompletedProcess[str]:
        async with live.async_client() as api:
            for i in range(TWINS):
                response = await api.put(f"/api/v1/twins/org.acme:b{i}", json={"desired": {}})
                assert response.status_code == 201
                acknowledged[f"org.acme:b{i}"] = 1
            stop = asyncio.Event()
            writers = [asyncio.create_task(write_on(api, t, stop)) for t in acknowledged]
            await asyncio.sleep(0.5)
            for twin in acknowledged:  # what was acknowledged before the backup started
                acknowledged[twin] = (await api.get(f"/api/v1/twins/{twin}")).json()["revision"]
            done = await asyncio.to_thread(backup, str(copy), "--data-dir", str(data))
            await asyncio.sleep(0.3)  # the writes go on after it
            stop.set()
            await asyncio.gather(*writers)
            return done

    try:
        done = asyncio.run(run())
        with live.client() as api:
            after = {t: api.get(f"/api/v1/twins/{t}").json()["revision"] for t in acknowledged}
    finally:
        live.stop()
    assert done.returncode == 0, done.stderr
    assert f"backed up {TWINS} twins" in done.stdout and str(copy) in done.stdout
    assert not list(tmp_path.glob(".backup.sqlite3.partial-*"))

    # Restore: the backup in place of the database of a new data directory.
    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    shutil.copyfile(copy, restored_dir / "twins.sqlite3")
    restored = ServiceProcess(restored_dir).start()
    try:
        with restored.client() as api:
            for twin, revision in acknowledged.items():
                got = api.get(f"/api/v1/twins/{twin}")
                assert got.status_code == 200, got.text
                body = got.json()
                # Every write acknowledged before the backup, none that did not happen: the
                # n-th write set n at revision n + 1.
                copied = body["desired"]["n"] + 1 if body["desired"] else 1
                assert revision <= copied <= after[twin], (twin, copied)
                # At a revision above any the live database handed out (test_restore.py).
                assert body["revision"] > after[twin], body
                # The twin and its journal were copied at one instant.
                since = {"since": body["revision"], "limit": 2}
                history = api.get(f"/api/v1/twins/{twin}/history", params=since).json()["items"]
                assert [e["revision"] for e in history] == [body["revision"]], twin
            # The built-in index came along too.
            found = api.get("/api/v1/search/twins", params={"filter": "exists(desired/n)"})
            assert found.status_code == 200 and len(found.json()["items"]) == min(TWINS, 25)
            twin = next(iter(acknowledged))
            assert api.put(f"/api/v1/twins/{twin}/desired/n", json=-1).status_code == 204
    finally:
        restored.stop()


def test_backup_refusals_are_one_line_and_leave_files_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    missing = backup(str(tmp_path / "b.sqlite3"), "--data-dir", str(data))
    assert missing.returncode == 1
    assert missing.stderr == f"twin-service: there is no twin store at {data / 'twins.sqlite3'}\n"

    ServiceProcess(data).start().stop()  # creates the database
    existing = tmp_path / "existing.sqlite3"
    existing.write_bytes(b"keep me")
    refused = backup(str(existing), "--data-dir", str(data))
    assert refused.returncode == 1
    assert "exists; choose another name or pass --force" in refused.stderr
    assert existing.read_bytes() == b"keep me"
    replaced = backup(str(existing), "--data-dir", str(data), "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert existing.read_bytes().startswith(b"SQLite format 3\x00")

    nowhere = backup(str(tmp_path / "no" / "such" / "dir.sqlite3"), "--data-dir", str(data))
    assert nowhere.returncode == 1 and "is not a directory" in nowhere.stderr
    assert backup(str(tmp_path), "--data-dir", str(data)).returncode == 1

    mongo = backup(
        str(tmp_path / "m"),
        "--data-dir",
        str(data),
        TWIN_STORE="mongodb",
        TWIN_MONGODB_URL="mongodb://db.invalid",
    )
    assert mongo.returncode == 2 and "mongodump" in mongo.stderr
    for line in (missing.stderr, refused.stderr, nowhere.stderr, mongo.stderr):
        assert line.count("\n") == 1 and "Traceback" not in line


def test_backup_refuses_to_overwrite_the_live_database_or_its_wal_and_shm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    live = ServiceProcess(data).start()
    try:
        with live.client() as api:
            assert api.put("/api/v1/twins/org.acme:kept", json={"desired": {}}).status_code == 201
        database = data / "twins.sqlite3"
        # Inodes: a backup renamed onto a file would change it; the contents of a live -wal
        # may change of themselves.
        before = {p.name: p.stat().st_ino for p in data.glob("twins.sqlite3*")}
        # The database and its companions, named plainly, relatively and through "..".
        for dest in (
            database,
            Path(f"{database}-wal"),
            Path(f"{database}-shm"),
            Path(f"{database}-journal"),
            data / ".." / "data" / "twins.sqlite3",
        ):
            refused = backup(str(dest), "--data-dir", str(data), "--force")
            assert refused.returncode == 2, (dest, refused.stdout, refused.stderr)
            assert refused.stderr.count("\n") == 1 and "is the twin store itself" in refused.stderr
        here = ["--data-dir", ".", "--force", "twins.sqlite3"]
        relative = subprocess.run(
            [sys.executable, "-m", "twin_service", "backup", *here],
            capture_output=True,
            text=True,
            timeout=120,
            env=service_env({"PYTHONPATH": str(Path(__file__).parents[2])}),
            cwd=data,
        )
        assert relative.returncode == 2, relative.stderr
        assert {p.name: p.stat().st_ino for p in data.glob("twins.sqlite3*")} == before
        with live.client() as api:
            assert api.put("/api/v1/twins/org.acme:after", json={"desired": {}}).status_code == 201
            assert api.get("/api/v1/twins/org.acme:kept").status_code == 200
    finally:
        live.stop()
    conn = sqlite3.connect(database)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM twins").fetchone() == (2,)
    finally:
        conn.close()


def test_backup_failures_to_write_are_one_line(tmp_path: Path) -> None:
    """A destination name the filesystem refuses, or a read-only filesystem: one line and
    status 1 (each was a traceback: the checks ran before the ``try``)."""
    data = tmp_path / "data"
    ServiceProcess(data).start().stop()
    for length in (240, 255, 300):  # the partial's name once exceeded 255 from 237 on
        dest = tmp_path / ("b" * length)
        done = backup(str(dest), "--data-dir", str(data))
        if length <= 255:
            assert done.returncode == 0, done.stderr
            assert dest.read_bytes().startswith(b"SQLite format 3\x00")
            dest.unlink()
        else:
            assert done.returncode == 1, done.stderr
            assert done.stderr.startswith(f"twin-service: cannot write {dest}: "), done.stderr
            assert done.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # A real read-only filesystem, in a mount namespace of its own (the test runs as root).
    readonly = tmp_path / "ro"
    readonly.mkdir()
    done = in_own_mounts(
        f"mount -t tmpfs -o ro,size=1m tmpfs {readonly}",
        f"backup {readonly}/b.sqlite3 --data-dir {data}",
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"twin-service: cannot write {readonly}/b.sqlite3: Read-only file system\n"
    ), done.stderr


def in_own_mounts(mount: str, command: str) -> subprocess.CompletedProcess[str]:
    """``twin-service COMMAND`` after ``mount``, in a mount namespace of its own (the test
    runs as root)."""
    script = f"{mount} && exec {sys.executable} -m twin_service {command}"
    return subprocess.run(
        ["unshare", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=service_env({}),
    )


def test_a_stopped_store_in_a_read_only_directory_is_said_to_need_its_shm(
    tmp_path: Path,
) -> None:
    """The backup only reads, yet it failed with "attempt to write a readonly database":
    SQLite creates the -shm of a WAL database to read it, and cannot in that directory."""
    data = tmp_path / "data"
    ServiceProcess(data).start().stop()
    assert not (data / "twins.sqlite3-shm").exists()
    dest = tmp_path / "b.sqlite3"
    # A real read-only directory, in a mount namespace of its own (the test runs as root).
    done = in_own_mounts(f"mount --bind -o ro {data} {data}", f"backup {dest} --data-dir {data}")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"twin-service: the backup of {data}/twins.sqlite3 failed: ")
    assert done.stderr.endswith(
        f" ({data} is not writable by this user, and SQLite must create twins.sqlite3-shm "
        "there to read the database)\n"
    ), done.stderr
    assert done.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_two_backups_to_one_new_name_do_not_both_write_it(tmp_path: Path) -> None:
    """Both passed the check for an existing file at their start and renamed their copy
    over the name at their end: the second replaced the first without --force."""
    data = tmp_path / "data"
    large_store(data, 48)  # copies long enough for both to be under way at once
    dest = tmp_path / "b.sqlite3"
    command = [sys.executable, "-m", "twin_service", "backup", str(dest), "--data-dir", str(data)]
    runs = [
        subprocess.Popen(command, env=service_env({}), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outcomes = sorted((run.wait(120), run.communicate()[1]) for run in runs)
    assert [status for status, _ in outcomes] == [0, 1], outcomes
    assert outcomes[1][1] == f"twin-service: {dest} exists; choose another name or pass --force\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.sqlite3", "data"]


def test_a_backup_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """A copy of every twin was created readable by every local user (umask 022), whatever
    the mode of the store it copied."""
    data = tmp_path / "data"
    ServiceProcess(data).start().stop()
    dest = tmp_path / "b.sqlite3"
    umask = os.umask(0o022)
    try:
        made = backup(str(dest), "--data-dir", str(data))
    finally:
        os.umask(umask)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_a_destination_that_is_not_a_regular_file_is_refused_even_with_force(
    tmp_path: Path,
) -> None:
    """--force renamed the copy over whatever DEST was: a FIFO, or a device node such as
    /dev/full (run as root), was replaced by a regular file."""
    data = tmp_path / "data"
    ServiceProcess(data).start().stop()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for force in (("--force",), ()):
        done = backup(str(fifo), "--data-dir", str(data), *force)
        assert done.returncode == 1, done.stderr
        assert done.stderr == (
            f"twin-service: {fifo} exists and is not a regular file; name a file\n"
        ), done.stderr
        assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "fifo"]


def test_a_destination_that_is_a_symlink_loop_is_one_line(tmp_path: Path) -> None:
    """The check that DEST is not the twin store resolved DEST: a symlink loop was a
    RuntimeError and a traceback, with or without --force."""
    data = tmp_path / "data"
    ServiceProcess(data).start().stop()
    loop = tmp_path / "l"
    loop.symlink_to("l2")
    (tmp_path / "l2").symlink_to("l")
    for force in (("--force",), ()):
        done = backup(str(loop), "--data-dir", str(data), *force)
        assert done.returncode == 1, done.stderr
        assert done.stderr == (
            f"twin-service: cannot write {loop}: Too many levels of symbolic links\n"
        ), done.stderr
        assert os.readlink(loop) == "l2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "l", "l2"]


def test_a_destination_ending_in_a_slash_names_a_directory(tmp_path: Path) -> None:
    """``backup newdir/`` wrote a file named newdir (Path drops the slash)."""
    data = tmp_path / "data"
    ServiceProcess(data).start().stop()
    for given in (f"{tmp_path}/newdir/", f"{tmp_path}/newdir/."):
        done = backup(given, "--data-dir", str(data))
        assert done.returncode == 1, done.stderr
        assert done.stderr == f"twin-service: cannot write {given}: no such directory\n"
    assert not (tmp_path / "newdir").exists()
    into = backup(f"{tmp_path}/", "--data-dir", str(data))
    assert into.returncode == 1 and "is a directory; name the backup file" in into.stderr


def large_store(data: Path, mib: int) -> None:
    """A database the backup takes a while to copy: the store's tables plus ``mib`` MiB."""
    ServiceProcess(data).start().stop()
    conn = sqlite3.connect(data / "twins.sqlite3")
    conn.execute("CREATE TABLE ballast (b BLOB)")
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
        "INSERT INTO ballast SELECT randomblob(1048576) FROM n",
        (mib,),
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)]
)
def test_a_backup_stopped_by_a_signal_leaves_no_partial_file(
    tmp_path: Path, sig: signal.Signals, status: int
) -> None:
    """Stopped while it copies (systemd's SIGTERM, a Ctrl-C, the hangup of a closed terminal):
    the partial copy (as large as the database) and its journal are removed, one line says
    so. The process is held with
    SIGSTOP once the partial file exists, so the signal surely arrives before the copy ends."""
    data = tmp_path / "data"
    large_store(data, 300)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "b.sqlite3"
    proc = subprocess.Popen(
        [sys.executable, "-m", "twin_service", "backup", str(dest), "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=service_env({}),
    )
    try:
        while not list(out.glob(".*partial*")):
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGSTOP)
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, stderr
    assert stderr == f"twin-service: the backup was interrupted ({sig.name}); {dest} not written\n"
    assert stdout == ""
    assert list(out.iterdir()) == []


def test_the_partial_file_of_a_backup_that_died_is_removed_by_the_next(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ServiceProcess(data).start().stop()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getpid()
    dest = tmp_path / "b.sqlite3"
    left = [tmp_path / f".b.sqlite3.partial-{dead.pid}", tmp_path / f".b.sqlite3.partial-{alive}"]
    for path in left:
        path.write_bytes(b"x" * 1000)
        path.with_name(path.name + "-journal").write_bytes(b"j")
    other = tmp_path / f".other.sqlite3.partial-{dead.pid}"  # another destination's
    other.write_bytes(b"x")
    done = backup(str(dest), "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            "data",
            "b.sqlite3",
            other.name,
            left[1].name,  # a backup still running (this process) keeps its file
            left[1].name + "-journal",
        ]
    )
