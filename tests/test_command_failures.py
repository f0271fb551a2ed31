"""A command that cannot do its work says why in one line, with no traceback and no secret.

Each case runs ``twin-service`` for real and reads what an operator would see: for ``serve``,
exit status 2 for settings (refused before anything starts) and 3 for a start that failed
(uvicorn's status); 1 for a ``devices`` or ``index`` command that failed; the reason on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from connectivity.credentials import CredentialStore, hash_password
from tests.servers.mosquitto import Mosquitto
from tests.servers.process import free_port
from tests.service_process import ServiceProcess
from twin_service.api.app import build_store
from twin_service.settings import Settings

SECRET = "never-print-this-secret"
USERINFO_SLASH = "has a '/', '?' or '#' before its '@'"


def command_env(**env: str) -> dict[str, str]:
    """This process's environment without its ``TWIN_*`` settings, on free ports, plus
    ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    base |= {"TWIN_MQTT__EMBEDDED_PORT": str(free_port()), "TWIN_PORT": str(free_port())}
    return base | env


def serve(
    tmp_path: Path, *args: str, preexec_fn: Callable[[], None] | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twin_service", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=command_env(**env),
        timeout=60,
        preexec_fn=preexec_fn,
    )


PR_CAPBSET_DROP = 24


def without_privileges() -> None:
    """In a child before it execs: as root, drop every capability from its bounding set, so
    that the program it runs has none, and root's own files hold it to their modes as any
    user's do. (Another user could not run this interpreter when it lies under /root.)"""
    if os.geteuid() != 0:
        return  # held to the modes already
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def serving(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...] = ("serve", "--data-dir", "data")
) -> subprocess.Popen[str]:
    """``serve`` started in ``tmp_path`` with ``env``, once it answers ``/health``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "twin_service", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the service exited before it answered:\n{out}{err}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{env['TWIN_PORT']}/health", timeout=1).is_success:
                return proc
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the service never answered /health")
        time.sleep(0.1)


def assert_refused(run: subprocess.CompletedProcess[str], status: int, *expected: str) -> None:
    output = run.stdout + run.stderr
    assert run.returncode == status, output
    for text in expected:
        assert text in run.stderr, output
    assert "Traceback" not in output, output
    assert SECRET not in output, output


def assert_cannot_start(run: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit status 3, and one line saying why: no line of amqtt's or uvicorn's besides."""
    assert_refused(run, 3, *expected)
    said = [line for line in run.stderr.splitlines() if not line.startswith("INFO")]
    assert len(said) == 1 and said[0].startswith("twin-service cannot start: "), run.stderr


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_config_file_that_is_not_toml_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text("port = [\n")
    run = serve(tmp_path, "serve", "--config", "broken.toml", "--data-dir", "data")
    assert_refused(run, 2, "invalid settings: broken.toml is not valid TOML")


@pytest.mark.parametrize("nested", ["[" * 1000 + "]" * 1000, "{a = " * 1000 + "1" + "}" * 1000])
def test_a_config_file_nested_too_deeply_is_named(tmp_path: Path, nested: str) -> None:
    """tomllib recurses once per level: 1,000 levels were a RecursionError, exit 1 and a
    traceback of 3,000 lines."""
    (tmp_path / "deep.toml").write_text(f"x = {nested}\n")
    run = serve(tmp_path, "--config", "deep.toml", "devices", "list")
    assert_refused(run, 2, "invalid settings: deep.toml is not valid TOML: nested too deeply\n")
    assert run.stderr.count("\n") == 1


def test_a_setting_nested_too_deeply_in_the_environment_is_named(tmp_path: Path) -> None:
    run = serve(tmp_path, "devices", "list", TWIN_AUTH__TOKENS="[" * 5000 + "]" * 5000)
    assert_refused(
        run, 2, "invalid settings: A TWIN_* value is not valid JSON: nested too deeply\n"
    )


@pytest.mark.parametrize("given_by", ["--config", "TWIN_CONFIG_FILE"])
@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("nope.toml", "Config file nope.toml does not exist."),
        ("folder", "Config file folder is a directory, not a TOML file."),
        ("latin1.toml", "latin1.toml is not UTF-8 text: invalid start byte at byte 8"),
        # A file the system refuses to read, even to root.
        ("/proc/self/mem", "Config file /proc/self/mem cannot be read: Input/output error."),
    ],
)
def test_a_config_file_that_cannot_be_used_is_named(
    tmp_path: Path, given_by: str, config: str, problem: str
) -> None:
    """Once TWIN_CONFIG_FILE naming no file was ignored, and an unreadable file was a
    traceback."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.toml").write_bytes(b'host = "\xff"\n')
    if given_by == "--config":
        run = serve(tmp_path, "--config", config, "devices", "list")
    else:
        run = serve(tmp_path, "devices", "list", TWIN_CONFIG_FILE=config)
    assert_refused(run, 2, f"twin-service: invalid settings: {problem}\n")
    assert run.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("name", "url", "problem"),
    [
        ("TWIN_MQTT_URL", f"http://device:{SECRET}@broker", "must start with mqtt:// or mqtts://"),
        ("TWIN_MQTT_URL", f"mqtt://device:{SECRET}@broker:99999", "has a port that is not"),
        ("TWIN_MQTT_URL", f"mqtt://device:{SECRET}@broker:0", "has port 0"),
        # `openssl rand -base64 24` makes a '/' in about 40% of passwords: it ends the host
        # part, and the error blamed the port.
        ("TWIN_MQTT_URL", f"mqtt://svc:AbC/{SECRET}+f=@broker:1884", USERINFO_SLASH),
        # Digits before the '/': read as host "svc", port 1884, without a word.
        ("TWIN_MQTT_URL", f"mqtt://svc:1884/{SECRET}@broker", USERINFO_SLASH),
        ("TWIN_MONGODB_URL", f"mongodb://user:a?{SECRET}@db", USERINFO_SLASH),
        ("TWIN_ELASTICSEARCH_URL", f"http://user:a#{SECRET}@es:9200", USERINFO_SLASH),
        ("TWIN_ELASTICSEARCH_URL", f"http://user:{SECRET}@es:0", "has port 0"),
        ("TWIN_ELASTICSEARCH_URL", f"elastic://user:{SECRET}@es", "must start with http://"),
        ("TWIN_MONGODB_URL", f"postgres://user:{SECRET}@db", "must start with mongodb://"),
    ],
)
def test_a_malformed_url_is_refused_without_repeating_it(
    tmp_path: Path, name: str, url: str, problem: str
) -> None:
    run = serve(tmp_path, "serve", "--data-dir", "data", **{name: url})
    setting = name.removeprefix("TWIN_").lower()
    assert_refused(run, 2, f"invalid settings: {setting}: {problem}")


def test_embedded_broker_port_0_is_refused(tmp_path: Path) -> None:
    """The OS would pick a port, and the service's own client dial 1883."""
    run = serve(tmp_path, "devices", "list", TWIN_MQTT__EMBEDDED_PORT="0")
    assert_refused(run, 2, "invalid settings: mqtt.embedded_port: Input should be greater than")


def test_every_command_reports_invalid_settings_the_same_way(tmp_path: Path) -> None:
    run = serve(tmp_path, "devices", "list", TWIN_PORT="eighty")
    assert_refused(run, 2, "invalid settings: port: Input should be a valid integer")


def test_an_empty_mqtt_client_id_is_refused(tmp_path: Path) -> None:
    """It passed the settings and failed the service's start with a traceback (exit 3): a
    persistent session needs a client id."""
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_MQTT__CLIENT_ID="")
    assert_refused(run, 2, "invalid settings: mqtt.client_id: String should have at least 1")


def test_a_tokens_file_that_cannot_be_used(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(f'[{{"name": "ops", "token": "{SECRET}", "role": "superuser"}}]')
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_AUTH__TOKENS_FILE=str(tokens))
    assert_refused(run, 2, f"The tokens file {tokens} cannot be used: role: Input should be")
    tokens.write_text("{not json")
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_AUTH__TOKENS_FILE=str(tokens))
    assert_refused(run, 2, "cannot be used: Expecting property name")


@pytest.mark.parametrize(
    ("source", "where"),
    [
        ("toml", "limits.bogus"),
        ("env", "limits.bogus"),
        ("env-tokens", "auth.tokens.0.namespace"),
    ],
)
def test_an_unknown_key_inside_a_section_or_a_token_is_refused(
    tmp_path: Path, source: str, where: str
) -> None:
    """Ignored, a misspelt key meant its default: for a token's ``namespaces``, all."""
    typo_token = f'[{{"name": "ops", "token": "{SECRET}", "namespace": ["org.acme"]}}]'
    env = {"env": {"TWIN_LIMITS__BOGUS": "1"}, "env-tokens": {"TWIN_AUTH__TOKENS": typo_token}}
    (tmp_path / "twin.toml").write_text("[limits]\nbogus = 1\n")
    config = ["--config", "twin.toml"] if source == "toml" else []
    run = serve(tmp_path, *config, "devices", "list", **env.get(source, {}))
    assert_refused(run, 2, f"invalid settings: {where}: Extra inputs are not permitted")


def test_an_unknown_key_in_a_tokens_file_entry_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(f'[{{"name": "ops", "token": "{SECRET}", "namespace": ["org.acme"]}}]')
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_AUTH__TOKENS_FILE=str(tokens))
    assert_refused(
        run, 2, f"The tokens file {tokens} cannot be used: namespace: Extra inputs are not"
    )


def test_a_namespace_no_twin_can_have_in_a_tokens_file_is_refused(tmp_path: Path) -> None:
    """Accepted, the token was valid in no namespace at all, without a word."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(
        f'[{{"name": "ops", "token": "{SECRET}", "namespaces": ["org.acme", "org.acme plant!"]}}]'
    )
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_AUTH__TOKENS_FILE=str(tokens))
    assert_refused(
        run, 2, f"The tokens file {tokens} cannot be used: namespaces.1: must be dotted words"
    )


def test_an_empty_tokens_file_is_refused_and_never_brings_back_the_admin_token(
    tmp_path: Path,
) -> None:
    """An emptied tokens file made the service fall back to a data_dir/admin-token left
    from an earlier start, without a word: that token could write again."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "admin-token").write_text(SECRET + "\n")
    tokens = tmp_path / "tokens.json"
    tokens.write_text("[]")
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_AUTH__TOKENS_FILE=str(tokens))
    assert_refused(run, 2, f"twin-service cannot start: The tokens file {tokens} holds no token")
    assert run.stderr.count("\n") == 1, run.stderr
    # With tokens in the file, the old admin token is refused.
    tokens.write_text(json.dumps([{"name": "ops", "token": "o" * 20, "role": "admin"}]))
    env = command_env(TWIN_AUTH__TOKENS_FILE=str(tokens), TWIN_MQTT__ENABLED="false")
    proc = serving(tmp_path, env)
    try:
        url = f"http://127.0.0.1:{env['TWIN_PORT']}/api/v1/twins/org.acme:old"
        old = httpx.put(url, json={}, headers={"Authorization": f"Bearer {SECRET}"})
        assert old.status_code == 401, old.text
        ops = httpx.put(url, json={}, headers={"Authorization": f"Bearer {'o' * 20}"})
        assert ops.status_code == 201, ops.text
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        (f"{SECRET[:8]} {SECRET[8:]}", "token: must be visible ASCII characters"),
        (SECRET[:11], "token: String should have at least 16 characters"),
    ],
)
def test_an_admin_token_file_that_cannot_be_used_is_named_without_its_value(
    tmp_path: Path, token: str, problem: str
) -> None:
    """A hand-written data_dir/admin-token the service cannot use: pydantic's several lines
    on stderr repeated it (``input_value=...``), after a log line said it was accepted."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin-token").write_text(token + "\n")
    run = serve(tmp_path, "serve", "--data-dir", "data")
    assert_refused(
        run,
        2,
        "twin-service cannot start: The admin token file data/admin-token cannot be used: "
        + problem,
    )
    assert token not in run.stdout + run.stderr
    assert run.stderr.count("\n") == 1, run.stderr


@pytest.mark.parametrize("same", ["token", "name"])
def test_a_token_or_a_name_given_twice_is_refused(tmp_path: Path, same: str) -> None:
    """The same token as read in auth.tokens and as admin in the file: the last won, and
    the read token could write."""
    reader = {"name": "viewer", "token": SECRET, "role": "read"}
    admin = {"name": "ops", "token": "a" * 20, "role": "admin"}
    admin[same] = reader[same]
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps([admin]))
    env = {"TWIN_AUTH__TOKENS_FILE": str(tokens), "TWIN_AUTH__TOKENS": json.dumps([reader])}
    run = serve(tmp_path, "serve", "--data-dir", "data", **env)
    said = {
        "token": f"tokens 'viewer' (auth.tokens) and 'ops' (the tokens file {tokens}) are the "
        "same token",
        "name": f"two tokens are named 'viewer' (auth.tokens, the tokens file {tokens})",
    }
    assert_refused(run, 2, f"twin-service cannot start: {said[same]}")
    assert run.stderr.count("\n") == 1, run.stderr


@pytest.mark.parametrize(
    "token",
    [
        f" {SECRET}",
        f"{SECRET} ",
        f"{SECRET[:8]} {SECRET[8:]}",
        f"{SECRET}\u00e9",
        f"{SECRET}\x00",
        f"{SECRET}\t",
        f"{SECRET}\u2028",
    ],
)
def test_a_token_no_authorization_header_can_carry_is_refused(tmp_path: Path, token: str) -> None:
    """Starlette reads headers as Latin-1 and the service strips the token's spaces: such a
    token was accepted at start and then never matched."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps([{"name": "ops", "token": token, "role": "admin"}]))
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_AUTH__TOKENS_FILE=str(tokens))
    assert_refused(run, 2, "cannot be used: token: must be visible ASCII characters")
    assert run.stderr.count("\n") == 1, run.stderr
    inline = json.dumps([{"name": "ops", "token": token, "role": "admin"}])
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_AUTH__TOKENS=inline)
    assert_refused(run, 2, "invalid settings: auth.tokens.0.token: must be visible ASCII")
    assert run.stderr.count("\n") == 1, run.stderr


def test_data_dir_and_config_before_the_command_apply_to_it_or_are_refused(
    tmp_path: Path,
) -> None:
    """Once only ``devices`` read them: ``serve`` served ./data, ``backup`` copied it."""
    env = command_env()
    proc = serving(tmp_path, env, ("--data-dir", "chosen", "serve"))
    proc.terminate()
    proc.communicate(timeout=30)
    assert (tmp_path / "chosen" / "twins.sqlite3").is_file()
    assert not (tmp_path / "data").exists()

    backed_up = serve(tmp_path, "--data-dir", "chosen", "backup", "copy.sqlite3")
    assert backed_up.returncode == 0, backed_up.stderr
    (tmp_path / "twin.toml").write_text('data_dir = "chosen"\n')
    backed_up = serve(tmp_path, "--config", "twin.toml", "backup", "copy2.sqlite3")
    assert backed_up.returncode == 0, backed_up.stderr
    # After the command, the same option is the same setting; two different values are not.
    twice = serve(tmp_path, "--data-dir", "chosen", "backup", "--data-dir", "other", "c.sqlite3")
    assert_refused(twice, 2, "--data-dir given twice, before and after backup: give it once")
    retire = serve(tmp_path, "--config", "a.toml", "mqtt", "retire", "--config", "b.toml", "x")
    assert_refused(retire, 2, "--config given twice, before and after mqtt")
    for command in (["simulate"], ["version"]):
        refused = serve(tmp_path, "--data-dir", "chosen", *command)
        assert_refused(refused, 2, f"--data-dir does not apply to {command[0]}")


def test_a_data_directory_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "occupied").write_text("a file where the directory should be")
    run = serve(tmp_path, "serve", "--data-dir", "occupied/data")
    assert_refused(run, 2, "twin-service cannot start:", "occupied/data")


def test_a_damaged_database_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "twins.sqlite3").write_bytes(b"not a database " * 300)
    run = serve(tmp_path, "serve", "--data-dir", "data")
    assert_cannot_start(
        run,
        "twin-service cannot start: The twin store cannot open data/twins.sqlite3: "
        "file is not a database",
    )


def test_a_database_file_the_user_cannot_write_is_named_and_nothing_is_left_behind(
    tmp_path: Path,
) -> None:
    """A non-root user served a database of mode 0400: the start failed (SQLite: "attempt
    to write a readonly database") but left a -wal and a -shm of mode 0400 behind, so once
    the operator made the named file writable, the next start failed the same way, and
    named the database still, not the -shm it could not write."""
    proc = serving(tmp_path, command_env())
    proc.terminate()
    proc.communicate(timeout=30)
    data = tmp_path / "data"
    database = data / "twins.sqlite3"
    database.chmod(0o400)
    before = sorted(p.name for p in data.iterdir())
    run = serve(tmp_path, "serve", "--data-dir", "data", preexec_fn=without_privileges)
    assert_cannot_start(
        run,
        "twin-service cannot start: The twin store cannot open data/twins.sqlite3: "
        "data/twins.sqlite3 is not readable and writable by this user (mode 0400, owner uid ",
    )
    assert sorted(p.name for p in data.iterdir()) == before
    # Left by an older start that failed so: the file the user cannot write is named.
    database.chmod(0o600)
    (data / "twins.sqlite3-shm").touch(mode=0o400)
    run = serve(tmp_path, "serve", "--data-dir", "data", preexec_fn=without_privileges)
    assert_cannot_start(
        run,
        "twin-service cannot start: The twin store cannot open data/twins.sqlite3: "
        "data/twins.sqlite3-shm is not readable and writable by this user (mode 0400, ",
    )
    (data / "twins.sqlite3-shm").unlink()
    data.chmod(0o555)  # where SQLite would create them
    run = serve(tmp_path, "serve", "--data-dir", "data", preexec_fn=without_privileges)
    data.chmod(0o755)
    assert_cannot_start(
        run,
        "twin-service cannot start: The twin store cannot open data/twins.sqlite3: the "
        "directory data is not writable by this user: SQLite creates the database's -wal",
    )
    assert sorted(p.name for p in data.iterdir()) == before
    proc = serving(tmp_path, command_env(), ("serve", "--data-dir", "data"))
    proc.terminate()
    proc.communicate(timeout=30)


def test_a_wal_the_user_cannot_write_beside_no_database_leaves_no_database_behind(
    tmp_path: Path,
) -> None:
    """The refusal named the -wal, but an empty database file was created first (the
    admin token is the service's first start's, whatever comes of it)."""
    data = tmp_path / "data"
    data.mkdir()
    wal = data / "twins.sqlite3-wal"
    wal.write_bytes(b"x" * 100)
    wal.chmod(0o400)
    run = serve(tmp_path, "serve", "--data-dir", "data", preexec_fn=without_privileges)
    assert_cannot_start(
        run,
        "twin-service cannot start: The twin store cannot open data/twins.sqlite3: "
        "data/twins.sqlite3-wal is not readable and writable by this user (mode 0400, ",
    )
    assert sorted(p.name for p in data.iterdir()) == ["admin-token", "twins.sqlite3-wal"]


@pytest.mark.parametrize(
    ("tables", "named"),
    [
        (["invoices (id INTEGER PRIMARY KEY, total REAL)"], "invoices"),
        # One of the twin store's table names was enough to be taken for it: with a meta
        # table the service started and wrote its tables into the file; with an events
        # table it failed on "no such column: twin_id", the file already turned to WAL.
        (["meta (key TEXT PRIMARY KEY, value TEXT)", "invoices (total REAL)"], "invoices, meta"),
        (["events (id INTEGER PRIMARY KEY, name TEXT)", "users (email TEXT)"], "events, users"),
        (["twins (twin_id TEXT)", "events (id INTEGER PRIMARY KEY, name TEXT)"], "events, twins"),
    ],
)
def test_another_applications_database_is_refused_and_left_as_it_is(
    tmp_path: Path, tables: list[str], named: str
) -> None:
    """Another application's SQLite file in place of the database: the service started
    empty on it and wrote its own tables into that file."""
    (tmp_path / "data").mkdir()
    database = tmp_path / "data" / "twins.sqlite3"
    conn = sqlite3.connect(database)
    for table in tables:
        conn.execute(f"CREATE TABLE {table}")
    conn.commit()
    conn.close()
    before = database.read_bytes()
    run = serve(tmp_path, "serve", "--data-dir", "data")
    assert_cannot_start(
        run,
        "twin-service cannot start: The twin store cannot open data/twins.sqlite3: "
        f"it holds tables of another application ({named}), not the twin store's",
    )
    assert database.read_bytes() == before
    assert sorted(p.name for p in database.parent.iterdir()) == ["admin-token", "twins.sqlite3"]


def test_the_embedded_broker_port_taken(tmp_path: Path, taken_port: int) -> None:
    """The line came third of three ERROR lines: amqtt's 'Broker startup failed' before it,
    uvicorn's 'Application startup failed. Exiting.' after it."""
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_MQTT__EMBEDDED_PORT=str(taken_port))
    assert_cannot_start(
        run, "twin-service cannot start: The embedded MQTT broker cannot start:", "in use"
    )


def unreachable_store(wait_seconds: str) -> dict[str, str]:
    # A closed port refuses at once (a listener that never answers would hang the client).
    return {
        "TWIN_STORE": "mongodb",
        "TWIN_MONGODB_URL": f"mongodb://user:{SECRET}@127.0.0.1:{free_port()}/twins",
        "TWIN_MONGODB__SERVER_SELECTION_TIMEOUT_MS": "300",
        "TWIN_MONGODB__START_WAIT_SECONDS": wait_seconds,
    }


def test_a_store_out_of_reach_with_no_wait(tmp_path: Path) -> None:
    run = serve(tmp_path, "serve", "--data-dir", "data", **unreachable_store("0"))
    assert_refused(run, 3, "twin-service cannot start: The twin store cannot open MongoDB")


def test_a_store_out_of_reach_is_waited_for_then_named(tmp_path: Path) -> None:
    """While it waits for its store the service is alive (/health) and answers everything
    else 503 service.starting; when the wait is over it exits as a failed start does."""
    env = command_env(**unreachable_store("4"))
    url = f"http://127.0.0.1:{env['TWIN_PORT']}"
    started = time.monotonic()
    proc = serving(tmp_path, env)
    try:
        ready = httpx.get(f"{url}/ready?require=store", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["status"] == "starting"
        store = ready.json()["checks"]["store"]
        assert store["status"] == "down"
        assert "The twin store cannot open MongoDB" in store["error"]
        assert SECRET not in ready.text
        twin = httpx.get(f"{url}/api/v1/twins/org.acme:x", timeout=5)
        assert twin.status_code == 503, twin.text
        assert twin.json()["error"] == "service.starting"
        assert twin.headers["retry-after"] == "1"
        metrics = httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
        assert "twin_service_starting 1" in metrics
        assert 'twin_service_check_up{check="store"} 0' in metrics
    finally:
        out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started >= 4  # it waited as long as it was told
    assert_refused(
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
        3,
        "the twin store does not answer; starting when it does",
        "twin-service cannot start: The twin store cannot open MongoDB",
    )


def test_a_search_engine_out_of_reach_is_named_and_the_service_starts(tmp_path: Path) -> None:
    """Twins are served without the engine (searches answer 503 until it is back), so the
    service starts, and says in one line, with no secret, what it waits for."""
    env = command_env(
        TWIN_SEARCH="elasticsearch",
        TWIN_ELASTICSEARCH_URL=f"http://user:{SECRET}@127.0.0.1:{free_port()}",
        TWIN_ELASTICSEARCH__REQUEST_TIMEOUT_SECONDS="1",
    )
    proc = serving(tmp_path, env)
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    output = out + err
    assert "search engine out of reach at start, indexing waits for it" in err, output
    assert "Traceback" not in output, output
    assert SECRET not in output, output


def test_a_search_engine_out_of_reach_is_reported_by_the_service_alone(tmp_path: Path) -> None:
    """With the engine down, the client logged each retry of each request at WARNING
    (``elastic_transport.node_pool: Node ... has failed``, ``elastic_transport.transport:
    Retrying request``): about 7 lines per readiness probe and per indexer retry, 63 of the
    66 lines a replica logged in 30 s, under the service's own line that says the same."""
    env = command_env(
        TWIN_SEARCH="elasticsearch",
        TWIN_ELASTICSEARCH_URL=f"http://127.0.0.1:{free_port()}",
        TWIN_ELASTICSEARCH__REQUEST_TIMEOUT_SECONDS="1",
        TWIN_LOG_LEVEL="info",
    )
    proc = serving(tmp_path, env)
    try:
        for _ in range(3):
            ready = httpx.get(f"http://127.0.0.1:{env['TWIN_PORT']}/ready", timeout=10)
            assert ready.json()["checks"]["index"]["status"] == "down", ready.text
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    output = out + err
    assert "elastic_transport" not in output, output
    warnings = [line for line in err.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert warnings, output
    for line in warnings:  # the start's line, and the indexer's at each of its retries
        assert line.startswith("WARNING twin_service.index.elasticsearch: "), output


def test_the_http_port_taken(tmp_path: Path, taken_port: int) -> None:
    """uvicorn bound the port once the store and the broker had started, then stopped them
    again and said why in its own words only (``ERROR: [Errno 98] error while attempting to
    bind...``). The port is bound first: nothing starts."""
    run = serve(tmp_path, "serve", "--data-dir", "data", TWIN_PORT=str(taken_port))
    assert_cannot_start(
        run,
        f"twin-service cannot start: the HTTP port 127.0.0.1:{taken_port} cannot be bound: ",
        "in use",
    )
    assert "startup" not in run.stderr and "MQTT" not in run.stderr, run.stderr


def test_credentials_for_an_id_no_twin_can_have_are_refused(tmp_path: Path) -> None:
    run = serve(tmp_path, "--data-dir", "data", "devices", "add", "no-namespace")
    assert_refused(run, 1, "error: Twin id 'no-namespace' is not valid.")
    assert not (tmp_path / "data" / "device-credentials.json").exists()


def credentials_file(**devices: object) -> str:
    return json.dumps({"format": 1, "devices": devices})


HASH = hash_password("pw")
CREATED = "2024-01-01T00:00:00+00:00"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{broken", "cannot be read: Expecting property name"),
        ("[]", "unknown credentials file format"),
        ('{"format": 1, "devices": []}', "the devices are not a map of id to hash"),
        (
            credentials_file(**{"org.a:b": "hash"}),
            "device 'org.a:b': not an object of hash, created and rotated",
        ),
        # Once a KeyError traceback from `devices list`.
        (credentials_file(**{"org.a:b": {"hash": HASH}}), "device 'org.a:b': 'created' is"),
        (
            credentials_file(**{"org.a:b": {"hash": "x", "created": CREATED}}),
            "device 'org.a:b': 'hash' is missing or not a $7$ password hash",
        ),
        (
            credentials_file(**{"org.a:b": {"hash": HASH + "\nsvc:x", "created": CREATED}}),
            "device 'org.a:b': 'hash' is missing or not a $7$ password hash",
        ),
        (
            credentials_file(**{"org.a:b": {"hash": HASH, "created": CREATED, "rotated": 1}}),
            "device 'org.a:b': 'rotated' is neither a time nor null",
        ),
        # Once a RecursionError traceback (and the embedded broker's credential watcher gone).
        pytest.param("[" * 100_000 + "]" * 100_000, "cannot be read: nested too deeply", id="deep"),
        # Once a UnicodeEncodeError traceback from `devices list`.
        (
            credentials_file(**{"org.a:b": {"hash": HASH, "created": "\udc00"}}),
            "device 'org.a:b': 'created' is missing or not a time",
        ),
        (
            credentials_file(**{"org.a:b": {"hash": HASH, "created": CREATED, "rotated": "x"}}),
            "device 'org.a:b': 'rotated' is neither a time nor null",
        ),
        # Python 3.11's fromisoformat takes any one character between date and time.
        (
            credentials_file(**{"org.a:b": {"hash": HASH, "created": "2024-01-01\udc0000:00"}}),
            "device 'org.a:b': 'created' is missing or not a time",
        ),
        (
            credentials_file(
                **{"org.a:b": {"hash": HASH, "created": CREATED, "rotated": "2024-01-01\n00:00"}}
            ),
            "device 'org.a:b': 'rotated' is neither a time nor null",
        ),
        # Once written into the mosquitto ACL as they were.
        (
            credentials_file(**{"org.a:b/#": {"hash": HASH, "created": CREATED}}),
            "device 'org.a:b/#': Twin id 'org.a:b/#' is not valid.",
        ),
        (
            credentials_file(**{"org.a:b+": {"hash": HASH, "created": CREATED}}),
            "device 'org.a:b+': twin id 'org.a:b+' cannot be used in an MQTT topic",
        ),
    ],
)
def test_a_damaged_credentials_file_is_named(tmp_path: Path, text: str, problem: str) -> None:
    credentials = tmp_path / "data" / "device-credentials.json"
    credentials.parent.mkdir()
    credentials.write_text(text)
    export = ["export-mosquitto", "--password-file", "pw", "--acl-file", "acl"]
    for command in (
        ["list"],
        ["add", "org.a:c"],
        ["rotate", "org.a:b"],
        ["remove", "org.a:b"],
        [*export, "--service-user", "svc"],
    ):
        run = serve(tmp_path, "--data-dir", "data", "devices", *command)
        assert_refused(run, 1, "error: data/device-credentials.json", problem)
        assert run.stderr.count("\n") == 1
    assert credentials.read_text() == text  # nothing written over it
    assert not (tmp_path / "acl").exists() and not (tmp_path / "pw").exists()


def test_an_index_rebuild_with_the_index_out_of_reach(tmp_path: Path) -> None:
    ServiceProcess(tmp_path / "data").start().stop()  # the rebuild opens existing stores only
    run = serve(
        tmp_path,
        "--data-dir",
        "data",
        "index",
        "rebuild",
        TWIN_SEARCH="elasticsearch",
        TWIN_ELASTICSEARCH_URL=f"http://user:{SECRET}@127.0.0.1:{free_port()}",
    )
    assert_refused(run, 1, "twin-service: rebuild failed: The search index failed to create")
    assert "Unclosed" not in run.stderr  # the client was closed
    # Not after the client's warnings at each of its retries (elastic_transport).
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_broker_that_refuses_the_service(
    tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> None:
    passwords = tmp_path / "passwd"
    CredentialStore(tmp_path / "devices.json").write_mosquitto_files(
        passwords, tmp_path / "acl", "service", "twins/{twinId}", service_password="right"
    )
    broker = mosquitto_factory(password_file=passwords, acl_file=tmp_path / "acl")
    run = serve(
        tmp_path,
        "serve",
        "--data-dir",
        "data",
        TWIN_MQTT_URL=f"mqtt://service:{SECRET}@127.0.0.1:{broker.port}",
    )
    assert_refused(run, 3, "twin-service cannot start: broker refused the connection")


@pytest.mark.parametrize("quiet", ["nan", "-1", "0", "inf"])
def test_retiring_needs_a_quiet_time_that_can_end(tmp_path: Path, quiet: str) -> None:
    """nan never ended the wait for queued messages; 0 or less ended it at once."""
    run = serve(tmp_path, "mqtt", "retire", "x", "--data-dir", "data", "--quiet-seconds", quiet)
    assert_refused(run, 2, "argument --quiet-seconds: must be a number of seconds above 0")


async def a_store(data_dir: Path) -> None:
    """A twin store in ``data_dir``: ``mqtt retire`` opens only a store that exists."""
    store = build_store(Settings(data_dir=data_dir))
    await store.open()
    await store.close()


async def test_retiring_needs_a_client_id(tmp_path: Path) -> None:
    """``mqtt retire "$REPLICA"`` with the variable unset ended in a 38-line traceback,
    "ValueError: a persistent session needs a stable client_id"."""
    await a_store(tmp_path / "data")
    url = f"mqtt://127.0.0.1:{free_port()}"
    run = serve(tmp_path, "mqtt", "retire", "", "--data-dir", "data", TWIN_MQTT_URL=url)
    assert_refused(run, 2, "error: argument client_id: the client id is empty")


async def test_retiring_a_session_needs_a_broker_that_answers(tmp_path: Path) -> None:
    run = serve(tmp_path, "mqtt", "retire", "twin-service-2", "--data-dir", "data")
    assert_refused(run, 2, "mqtt retire needs an external broker (mqtt_url)")
    await a_store(tmp_path / "data")
    run = serve(
        tmp_path,
        "mqtt",
        "retire",
        "twin-service-2",
        "--data-dir",
        "data",
        TWIN_MQTT_URL=f"mqtt://service:{SECRET}@127.0.0.1:{free_port()}",
        TWIN_MQTT__ENABLED="true",
        TWIN_MQTT__CONNECT_TIMEOUT_SECONDS="1",
    )
    assert_refused(run, 1, "twin-service: retire failed: no MQTT session within 1.0s")


@pytest.mark.parametrize(
    ("user", "problem"),
    [
        ("org:svc", "contains ':', where mosquitto splits a password-file line"),
        ("svc user", "contains whitespace or a control character"),
        ("", "the service user is empty"),
        ("#svc", "starts with '#'"),
    ],
)
def test_a_service_user_mosquitto_cannot_hold_is_refused(
    tmp_path: Path, user: str, problem: str
) -> None:
    """mosquitto splits a password-file line at its first ':' and reads '#' as a comment; an
    empty user wrote ':$7$...' and a bare 'user ' ACL line. All were written, exit 0."""
    export = ["--data-dir", "data", "devices", "export-mosquitto", "--password-file", "pw"]
    run = serve(tmp_path, *export, "--acl-file", "acl", "--service-user", user)
    assert_refused(run, 2, "error: argument --service-user:", problem)
    assert not (tmp_path / "pw").exists() and not (tmp_path / "acl").exists()


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_an_empty_service_password_is_refused(tmp_path: Path, stdin: str) -> None:
    """``--service-password-stdin < /dev/null`` hashed an empty password: any client could
    log in as the service sending none."""
    export = ["--data-dir", "data", "devices", "export-mosquitto", "--password-file", "pw"]
    export += ["--acl-file", "acl", "--service-user", "svc", "--service-password-stdin"]
    run = subprocess.run(
        [sys.executable, "-m", "twin_service", *export],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=command_env(),
        timeout=60,
    )
    assert_refused(run, 2, "--service-password-stdin: the password read from stdin is empty")
    assert run.stderr.count("\n") == 1
    assert not (tmp_path / "pw").exists() and not (tmp_path / "acl").exists()


def test_a_service_password_file_without_the_password_is_a_usage_error(tmp_path: Path) -> None:
    """``--service-password-file`` without ``--service-password-stdin`` was reported as a
    failure of the credentials (``error: a service password file needs the service
    password``, exit 1), where its sibling usage mistakes exit 2 naming the command."""
    export = ["--data-dir", "data", "devices", "export-mosquitto", "--password-file", "pw"]
    export += ["--acl-file", "acl", "--service-user", "svc", "--service-password-file", "spw"]
    run = serve(tmp_path, *export)
    assert_refused(
        run,
        2,
        "twin-service devices export-mosquitto: --service-password-file needs "
        "--service-password-stdin",
    )
    assert run.stderr.count("\n") == 1
    assert not [p for p in tmp_path.iterdir() if p.name in ("pw", "acl", "spw")]


def export_mosquitto(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``devices export-mosquitto`` on ``data`` with the service password on stdin."""
    command = ["--data-dir", "data", "devices", "export-mosquitto", "--service-user", "svc"]
    return subprocess.run(
        [sys.executable, "-m", "twin_service", *command, "--service-password-stdin", *args],
        input="s3cret\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=command_env(**env),
        timeout=60,
    )


def test_export_never_writes_over_the_service_files(tmp_path: Path) -> None:
    """``--acl-file data/twins.sqlite3`` wrote the ACL over the running service's database
    (exit 0; after a restart, exit 3 "database disk image is malformed"), and
    ``--password-file data/device-credentials.json`` over the credentials: every device
    login then failed. Whatever the spelling, every output naming one is refused."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "twins.sqlite3").symlink_to(tmp_path / "store.sqlite3")
    added = serve(tmp_path, "--data-dir", "data", "devices", "add", "org.acme:pump-1")
    assert added.returncode == 0, added.stderr
    own = {
        "data/device-credentials.json": "device credentials",
        "data/.device-credentials.json.lock": "",
        "store.sqlite3": "the twin store",
        "data/twins.sqlite3-wal": "its write-ahead log",
        "data/twins.sqlite3-shm": "its shared memory",
        "store.sqlite3-journal": "its journal",
        "data/admin-token": "the admin token",
        "tokens.json": "[]",
    }
    for name, text in own.items():
        if name != "data/device-credentials.json":
            (tmp_path / name).write_text(text)
    before = {name: (tmp_path / name).read_bytes() for name in own}
    spellings = [*own, "data/../data/twins.sqlite3", "data/twins.sqlite3"]
    spellings.append(str(data / "admin-token"))
    options = ["--password-file", "--acl-file", "--service-password-file"]
    for n, target in enumerate(spellings):
        outputs = {option: f"out-{option[2:]}" for option in options}
        outputs[options[n % 3]] = target
        args = [part for pair in outputs.items() for part in pair]
        run = export_mosquitto(tmp_path, *args, TWIN_AUTH__TOKENS_FILE="tokens.json")
        assert_refused(run, 2, f"{options[n % 3]}: {target} is ", "name another file")
        assert run.stderr.count("\n") == 1, run.stderr
        assert {name: (tmp_path / name).read_bytes() for name in own} == before
        assert not list(tmp_path.glob("out-*"))


def test_export_refuses_two_outputs_naming_one_file(tmp_path: Path) -> None:
    """The later file replaced the earlier: mosquitto read an ACL as its password file."""
    (tmp_path / "etc").mkdir()
    args = ["--password-file", "etc/pw", "--acl-file", "etc/../etc/pw"]
    run = export_mosquitto(tmp_path, *args, "--service-password-file", "spw")
    assert_refused(run, 2, "--acl-file: etc/../etc/pw is the file of --password-file (etc/pw)")
    assert run.stderr.count("\n") == 1 and not list((tmp_path / "etc").iterdir())


def test_export_writes_every_file_or_none(tmp_path: Path) -> None:
    """An ACL file that could not be written (its directory missing) failed after the
    password file had been replaced, naming a temporary file ('nodir/.acl.6fff72f0.tmp'):
    mosquitto reloaded the new passwords with the old ACL."""
    (tmp_path / "pw").write_text("the previous passwords\n")
    (tmp_path / "spw").write_text("the previous service password\n")
    for args in (
        ["--password-file", "pw", "--acl-file", "nodir/acl", "--service-password-file", "spw"],
        ["--password-file", "pw", "--acl-file", "acl", "--service-password-file", "nodir/spw"],
        ["--password-file", "pw", "--acl-file", "adir", "--service-password-file", "spw"],
    ):
        (tmp_path / "adir").mkdir(exist_ok=True)
        run = export_mosquitto(tmp_path, *args)
        wrong = next(path for path in args if path in ("nodir/acl", "nodir/spw", "adir"))
        assert_refused(run, 1, f"error: cannot write {wrong}: ")
        assert run.stderr.count("\n") == 1 and ".tmp" not in run.stderr, run.stderr
        assert (tmp_path / "pw").read_text() == "the previous passwords\n"
        assert (tmp_path / "spw").read_text() == "the previous service password\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "pw", "spw"]


@pytest.mark.parametrize("module", ["twin_service.cli", "connectivity.simulate"])
def test_ctrl_c_while_a_command_starts_exits_130_without_a_traceback(
    tmp_path: Path, module: str
) -> None:
    """A Ctrl-C in the second before a command set its own handler (while it imported and
    parsed) ended in a KeyboardInterrupt traceback, the process killed by the signal (-2).
    ``simulate`` sets its handler latest, once connecting (a loaded machine took 2 s). The
    signal is sent as ``module`` is imported (``-X importtime`` says when): sent after a
    fixed time, it came before Python itself had started on a loaded machine."""
    run = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "twin_service",
            "simulate",
            "--url",
            "mqtt://127.0.0.1:1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=command_env(),
    )
    assert run.stderr is not None
    for line in run.stderr:
        if line.rstrip().endswith(f"| {module}"):
            break
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert (run.returncode, "Traceback" in err) == (130, False), out + err
