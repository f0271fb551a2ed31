"""Settings sources and validation, and the command line, without a server."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from twin_service import __version__
from twin_service.collector import tune_gc
from twin_service.settings import Settings, describe_invalid, load_settings, stray_variables


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TWIN_"):
            monkeypatch.delenv(key)


def test_defaults_env_and_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env(monkeypatch)
    defaults = Settings()
    assert defaults.store == "sqlite" and defaults.search == "builtin"
    assert defaults.limits.max_twin_bytes == 65536 and defaults.query.max_size == 200
    config = tmp_path / "twin.toml"
    config.write_text("port = 9000\n[limits]\nmax_depth = 8\n[query]\ndefault_size = 10\n")
    monkeypatch.setenv("TWIN_LIMITS__MAX_DEPTH", "12")  # the environment wins over the file
    settings = load_settings(config)
    assert settings.port == 9000
    assert settings.limits.max_depth == 12
    assert settings.query.default_size == 10
    assert load_settings(config, port=9100).port == 9100  # and the CLI over both


#: Topic prefixes the service cannot subscribe with, and what the refusal says. Accepted
#: before, the first three built filters paho refused (``twins/x+/get``): the service never
#: subscribed, /ready said ready, and devices' reports were acknowledged and dropped.
BAD_PREFIXES = [
    ("twins/x{twinId}", "{twinId} must be a whole topic level"),
    ("twins/{twinId}-dev", "{twinId} must be a whole topic level"),
    ("{twinId}x/data", "{twinId} must be a whole topic level"),
    # A shared subscription's filter (and $SYS): the broker reads a first level with $.
    ("$share/g/{twinId}", "topic prefix must not start with '$'"),
    ("$SYS/{twinId}", "topic prefix must not start with '$'"),
    ("twins/\x00/{twinId}", "topic prefix must not contain a control character"),
    ("twins\n/{twinId}", "topic prefix must not contain a control character"),
    ("twins/\x7f/{twinId}", "topic prefix must not contain a control character"),
    ("twins/{twinId}/+", "topic prefix must not contain wildcards"),
]


@pytest.mark.parametrize(("prefix", "message"), BAD_PREFIXES)
def test_a_topic_prefix_the_service_cannot_subscribe_with_is_refused(
    monkeypatch: pytest.MonkeyPatch, prefix: str, message: str
) -> None:
    clean_env(monkeypatch)
    with pytest.raises(ValidationError) as refused:
        Settings(mqtt={"topic_prefix": prefix})  # type: ignore[arg-type]
    assert describe_invalid(refused.value).startswith(f"mqtt.topic_prefix: {message}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"host": "0.0.0.0", "auth": {"disabled": True}}, "loopback"),
        ({"store": "mongodb"}, "mongodb_url"),
        ({"search": "elasticsearch"}, "elasticsearch_url"),
        (
            {
                "search": "elasticsearch",
                "elasticsearch_url": "http://127.0.0.1:9200",
                "elasticsearch": {"ca_file": __file__},
            },
            "ca_file needs an https:// elasticsearch_url",
        ),
        (
            {
                "search": "elasticsearch",
                "elasticsearch_url": "https://127.0.0.1:9200",
                "elasticsearch": {"ca_file": "no-such-ca.pem"},
            },
            "ca_file: no such file",
        ),
        ({"mqtt": {"topic_prefix": "devices/x"}}, "twinId"),
        ({"mqtt": {"topic_prefix": "a/{twinId}/{twinId}"}}, "exactly once"),
        ({"mqtt": {"topic_prefix": "a/#/{twinId}"}}, "wildcards"),
        # The device of that twin logged in as the service's username, with its own password,
        # and took the service's session on the built-in broker.
        ({"mqtt": {"service_username": "service:main"}}, "is the username of a device"),
        ({"mqtt": {"service_username": "service%3Amain"}}, "is the username of a device"),
        ({"query": {"default_size": 300, "max_size": 200}}, "default_size"),
        ({"limits": {"max_twin_bytes": 10}}, "max_twin_bytes"),
        ({"unknown_setting": 1}, "unknown_setting"),
        # Every POST /twins would have answered 400 twin.id.invalid.
        ({"default_namespace": "bad ns!"}, "must be dotted words"),
        ({"default_namespace": "org/acme"}, "must be dotted words"),
        ({"default_namespace": "a" * 220}, "at most 219 characters"),
    ],
)
def test_insecure_or_inconsistent_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, object], message: str
) -> None:
    clean_env(monkeypatch)
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]


def test_a_default_namespace_that_generated_ids_can_use_is_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clean_env(monkeypatch)
    for namespace in ("org.acme.plant_1", "", "a" * 219):
        assert Settings(default_namespace=namespace).default_namespace == namespace


def test_an_invalid_default_namespace_stops_a_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    bad = subprocess.run(
        [sys.executable, "-m", "twin_service", "--data-dir", str(tmp_path), "devices", "list"],
        capture_output=True,
        text=True,
        env={**env, "TWIN_DEFAULT_NAMESPACE": "bad ns!"},
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("twin-service: invalid settings: default_namespace: must be")
    assert bad.stderr.count("\n") == 1


@pytest.mark.parametrize("command", [["devices", "add", "org.acme:d"], ["serve"], ["backup", "b"]])
def test_a_data_dir_that_is_a_file_stops_a_command_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    """Each command failed in its own words, none naming the cause: "[Errno 17] File
    exists", "there is no twin store at <file>/twins.sqlite3"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    a_file = tmp_path / "data"
    a_file.write_text("not a directory")
    bad = subprocess.run(
        [sys.executable, "-m", "twin_service", "--data-dir", str(a_file), *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert (bad.returncode, bad.stderr) == (
        2,
        f"twin-service: invalid settings: data_dir: {a_file} is not a directory\n",
    )
    assert a_file.read_text() == "not a directory"


@pytest.mark.parametrize("prefix", ["$share/g/{twinId}", "twins/x{twinId}"])
def test_serve_refuses_a_topic_prefix_it_cannot_subscribe_with(tmp_path: Path, prefix: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    bad = subprocess.run(
        [sys.executable, "-m", "twin_service", "serve", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**env, "TWIN_MQTT__TOPIC_PREFIX": prefix},
        # Not a timed assertion: before the check, serve ran (and never exited) with it.
        timeout=120,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("twin-service: invalid settings: mqtt.topic_prefix: ")
    assert bad.stderr.count("\n") == 1, bad.stderr


@pytest.mark.parametrize(
    "prefix",
    ["twins/{twinId}", "{twinId}", "a/b/{twinId}/c", "org.acme/{twinId}", "twins$/{twinId}"],
)
def test_a_topic_prefix_with_twin_id_a_whole_level_is_accepted(
    monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    clean_env(monkeypatch)
    assert Settings(mqtt={"topic_prefix": prefix}).mqtt.topic_prefix == prefix  # type: ignore[arg-type]


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_cli_version_and_bad_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    version = subprocess.run(
        [sys.executable, "-m", "twin_service", "version"], capture_output=True, text=True, env=env
    )
    assert version.returncode == 0 and version.stdout.strip() == __version__
    bad = subprocess.run(
        [sys.executable, "-m", "twin_service", "serve", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**env, "TWIN_STORE": "mongodb"},
    )
    assert bad.returncode == 2 and "mongodb_url" in bad.stderr


def test_serve_keeps_full_collections_rare() -> None:
    """``serve`` freezes what start-up built and applies ``gc_thresholds``."""
    before = gc.get_threshold()
    try:
        tune_gc(Settings(gc_thresholds=(900, 12, 345)).gc_thresholds)
        assert gc.get_threshold() == (900, 12, 345)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_stray_variables_are_named_with_the_setting_meant() -> None:
    environ = {
        "TWIN_AUTH_DISABLED": "true",  # one underscore: the section's delimiter is two
        "TWIN_MQTT_EMBEDDED_PORT": "1884",
        "twin_prot": "8081",  # read case-insensitively, as the settings themselves are
        "TWIN_FROBNICATE": "1",
        "TWIN_PORT": "8081",
        "TWIN_LIMITS__MAX_DEPTH": "8",
        "TWIN_CONFIG_FILE": "x.toml",
        "TWIN_TOKEN": "t",  # simulate's
        "TWIN_TEST_REQUIRE_SERVERS": "1",  # the test suite's
        "PATH": "/bin",
    }
    assert stray_variables(environ) == [
        "TWIN_AUTH_DISABLED is not a setting and is ignored (TWIN_AUTH__DISABLED?)",
        "TWIN_FROBNICATE is not a setting and is ignored",
        "TWIN_MQTT_EMBEDDED_PORT is not a setting and is ignored (TWIN_MQTT__EMBEDDED_PORT?)",
        "twin_prot is not a setting and is ignored (TWIN_PORT?)",
    ]


def test_a_command_warns_of_a_stray_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    run = subprocess.run(
        [sys.executable, "-m", "twin_service", "--data-dir", str(tmp_path), "devices", "list"],
        capture_output=True,
        text=True,
        env={**env, "TWIN_AUTH_DISABLED": "true", "TWIN_TOKEN": "t"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == (
        "twin-service: warning: TWIN_AUTH_DISABLED is not a setting and is ignored "
        "(TWIN_AUTH__DISABLED?)\n"
    )


def test_mqtt_protocol_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TWIN_MQTT__PROTOCOL=4`` was refused ("Input should be 5 or 4"): an environment
    value is a string, which the literal 4 is not; TOML and JSON numbers worked."""
    clean_env(monkeypatch)
    for value in ("4", "5"):
        monkeypatch.setenv("TWIN_MQTT__PROTOCOL", value)
        assert Settings().mqtt.protocol == int(value)
    for value in ("3", "4.0", "x"):
        monkeypatch.setenv("TWIN_MQTT__PROTOCOL", value)
        with pytest.raises(ValidationError, match=r"mqtt\.protocol"):
            Settings()


#: Settings accepted before that failed later: a traceback at start, a thread dead in the
#: background, every write answered 500, unacknowledged writes, or a silent 0.
BAD_ENVIRONMENT = [
    # paho's struct.error in its thread: the service never connected, /ready 503 forever.
    ("TWIN_MQTT__SESSION_EXPIRY_SECONDS", "4294967296", "mqtt.session_expiry_seconds"),
    # Twice it was past MQTT's largest packet (now clamped), and no device could get such
    # a twin.
    ("TWIN_LIMITS__MAX_TWIN_BYTES", str(2**28 + 1), "limits.max_twin_bytes"),
    # pymongo's InvalidName at start (exit 3, a traceback).
    ("TWIN_MONGODB__DATABASE", "a.b", "mongodb.database"),
    ("TWIN_MONGODB__DATABASE", "bad/na me", "mongodb.database"),
    ("TWIN_MONGODB__DATABASE", "", "mongodb.database"),
    ("TWIN_MONGODB__DATABASE", "a$b", "mongodb.database"),
    ("TWIN_MONGODB__DATABASE", "a" * 64, "mongodb.database"),
    # w=0: the driver refused it at start, and unacknowledged writes could be lost.
    ("TWIN_MONGODB__WRITE_CONCERN", "0", "mongodb.write_concern"),
    ("TWIN_MONGODB__WRITE_CONCERN", "00", "mongodb.write_concern"),
    # pymongo's "must be ... less than one billion" (seconds) at start, a traceback.
    ("TWIN_MONGODB__OPERATION_TIMEOUT_MS", "10000000000000", "mongodb.operation_timeout_ms"),
    (
        "TWIN_MONGODB__SERVER_SELECTION_TIMEOUT_MS",
        "10000000000000",
        "mongodb.server_selection_timeout_ms",
    ),
    # OverflowError in every write's journal pruning: each answered 500.
    ("TWIN_STREAM__JOURNAL_MAX_AGE_SECONDS", "100000000000", "stream.journal_max_age_seconds"),
    # OverflowError in the checkpoint thread, which died.
    ("TWIN_SQLITE__CHECKPOINT_INTERVAL_MS", "10000000000000", "sqlite.checkpoint_interval_ms"),
    # Past a C int, SQLite read these as 0: no wait for the write lock, the automatic
    # checkpoint off (the WAL grew for good), a cache of no pages.
    ("TWIN_SQLITE__BUSY_TIMEOUT_MS", str(2**31), "sqlite.busy_timeout_ms"),
    ("TWIN_SQLITE__WAL_AUTOCHECKPOINT", str(2**31), "sqlite.wal_autocheckpoint"),
    ("TWIN_SQLITE__CACHE_MIB", str(2**21), "sqlite.cache_mib"),
    ("TWIN_SQLITE__WRITER_CACHE_MIB", str(2**21), "sqlite.writer_cache_mib"),
    # Accepted, the token worked in no namespace.
    (
        "TWIN_AUTH__TOKENS",
        '[{"name": "b", "token": "bbbbbbbbbbbbbbbbbbbb", "namespaces": ["org.acme plant!"]}]',
        "auth.tokens.0.namespaces.0",
    ),
]


@pytest.mark.parametrize(("variable", "value", "setting"), BAD_ENVIRONMENT)
def test_a_setting_that_failed_later_stops_a_command_in_one_line(
    tmp_path: Path, variable: str, value: str, setting: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    bad = subprocess.run(
        [sys.executable, "-m", "twin_service", "--data-dir", str(tmp_path), "devices", "list"],
        capture_output=True,
        text=True,
        env={**env, variable: value},
        timeout=60,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith(f"twin-service: invalid settings: {setting}: "), bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr


#: The bounds themselves, and what else the checks above take.
ACCEPTED = [
    {"limits": {"max_twin_bytes": 2**28}},
    {"mqtt": {"session_expiry_seconds": 2**32 - 1}},
    {"mongodb": {"database": "a" * 63, "write_concern": "1"}},
    {"mongodb": {"database": "ü" * 31, "write_concern": "majority"}},
    {"mongodb": {"operation_timeout_ms": 86_400_000, "server_selection_timeout_ms": 86_400_000}},
    {"stream": {"journal_max_age_seconds": 100 * 366 * 24 * 3600}},
    {"sqlite": {"checkpoint_interval_ms": 3_600_000, "busy_timeout_ms": 2**31 - 1}},
    {"sqlite": {"wal_autocheckpoint": 2**31 - 1, "cache_mib": 2**21 - 1}},
    {"auth": {"tokens": [{"name": "b", "token": "b" * 16, "namespaces": ["", "org.a_1"]}]}},
]


@pytest.mark.parametrize("overrides", ACCEPTED)
def test_values_within_the_bounds_are_accepted(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, object]
) -> None:
    clean_env(monkeypatch)
    Settings(**overrides)  # type: ignore[arg-type]
