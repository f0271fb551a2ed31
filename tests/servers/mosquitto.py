"""A mosquitto broker of our own, for tests: free loopback port, persistence, restartable.

Install the binary with `scripts/servers/install-mosquitto`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from tests.servers.process import (
    LocalServer,
    ManagedProcess,
    ServerStartError,
    free_port,
    port_accepts,
)

INSTALL_HINT = "not installed: run scripts/servers/install-mosquitto"

# Debian puts the broker in /usr/sbin, which is not on every user's PATH.
_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin")

DEFAULT_LOG_TYPES = ("error", "warning", "notice", "information")


def find_binary(name: str = "mosquitto") -> Path | None:
    """Path of a mosquitto executable (`mosquitto`, `mosquitto_passwd`...), or None."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SEARCH_DIRS))
    return Path(found) if found else None


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """Write a mosquitto password file for `users` (name -> password) with mosquitto_passwd."""
    tool = find_binary("mosquitto_passwd")
    if tool is None:
        raise FileNotFoundError(f"mosquitto_passwd {INSTALL_HINT}")
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([tool, "-b", path, user, password], check=True, capture_output=True)
    return path


class Mosquitto(LocalServer):
    """One mosquitto broker listening on 127.0.0.1.

    All its files live in `workdir`: `mosquitto.conf`, `persistence/`, `mosquitto.log` (the
    broker's log) and `output.log` (its stdout/stderr). The port is chosen at the first start
    and kept, with the persistence directory, across `restart()`, so persistent sessions and
    queued QoS 1/2 messages survive a restart (mosquitto saves them on SIGTERM; `kill()`
    loses what was not autosaved).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        binary: Path | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int = 100,
        log_types: Sequence[str] = DEFAULT_LOG_TYPES,
        extra_config: Sequence[str] = (),
        start_timeout: float = 10.0,
        run_as: str | None = None,
    ) -> None:
        """`allow_anonymous` defaults to True without a password file, False with one.
        `run_as` is the user mosquitto switches to when started as root (the current user by
        default: it may read our files); the broker must be able to reach the files named.

        `max_queued_messages` must stay positive: 0 ("unlimited") misbehaves in some 2.0.x
        releases, and the packaged default of 1000 silently drops messages under load.
        `extra_config` lines are appended to the generated configuration verbatim.
        """
        resolved = binary or find_binary()
        if resolved is None:
            raise FileNotFoundError(f"mosquitto {INSTALL_HINT}")
        if max_queued_messages <= 0:
            raise ValueError("max_queued_messages must be positive")
        self.binary = resolved
        self.workdir = workdir
        self.port = port
        self.password_file = password_file
        self.acl_file = acl_file
        self.allow_anonymous = password_file is None if allow_anonymous is None else allow_anonymous
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.log_types = tuple(log_types)
        self.extra_config = tuple(extra_config)
        self.start_timeout = start_timeout
        self.run_as = run_as or pwd.getpwuid(os.getuid()).pw_name
        self.config_path = workdir / "mosquitto.conf"
        self.persistence_dir = workdir / "persistence"
        self.log_path = workdir / "mosquitto.log"
        self.output_path = workdir / "output.log"
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self._bound_port()}"

    def start(self) -> Self:
        """Write the config, start the broker and wait until its port accepts connections."""
        if self.running():
            raise RuntimeError(f"mosquitto already running on port {self.port}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persistence_dir.mkdir(exist_ok=True)
        # A free port can be taken between our probe and the broker's bind: retry then, but
        # never move a broker that already has a port (restart must keep it).
        attempts = 1 if self.port is not None else 3
        for attempt in range(attempts):
            port = self.port if self.port is not None else free_port(self.host)
            try:
                self._start_on(port)
            except ServerStartError as exc:
                if attempt + 1 < attempts and "Address already in use" in str(exc):
                    continue
                raise
            self.port = port
            return self
        raise AssertionError("unreachable")

    def config_text(self, port: int) -> str:
        """The generated mosquitto.conf for `port`."""
        lines = [
            "per_listener_settings false",
            f"listener {port} {self.host}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence true",
            # mosquitto joins location and file name by plain concatenation.
            f"persistence_location {self.persistence_dir}/",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_inflight_messages {self.max_inflight_messages}",
            # As the shipped configurations: Nagle's algorithm holds an answer that follows a
            # PUBACK for the peer's delayed ACK (40 ms a round trip).
            "set_tcp_nodelay true",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        lines.extend(self._harness_lines())
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    def _harness_lines(self) -> list[str]:
        """What every configuration of ours needs in a test: the persistence file's name, the
        log (start() waits for its "running") and the user to run as."""
        return [
            "persistence_file mosquitto.db",
            "log_dest file " + str(self.log_path),
            *(f"log_type {log_type}" for log_type in self.log_types),
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            # Started as root, mosquitto would switch to the `mosquitto` user and lose access
            # to our files; naming the current user keeps it as it is.
            f"user {self.run_as}",
        ]

    def _start_on(self, port: int) -> None:
        self.config_path.write_text(self.config_text(port))
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        process = ManagedProcess([self.binary, "-c", self.config_path], self.output_path)
        process.start()
        self._process = process

        # The port alone proves nothing: another process may hold it while our broker is
        # failing to bind. mosquitto logs "running" only once its listeners are open.
        def ready() -> bool:
            if not self.log_path.exists():
                return False
            with self.log_path.open("rb") as log:
                log.seek(log_offset)
                started = b" running\n" in log.read()
            return started and port_accepts(self.host, port)

        try:
            process.wait_until(
                ready,
                self.start_timeout,
                f"mosquitto on {self.host}:{port}",
                [self.output_path, self.log_path],
            )
        except ServerStartError:
            process.stop()
            self._process = None
            raise

    def _bound_port(self) -> int:
        if self.port is None:
            raise RuntimeError("mosquitto has not been started")
        return self.port

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<Mosquitto {self.host}:{self.port} {state} workdir={self.workdir}>"


#: The configuration deploy/mosquitto ships.
SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"


class ShippedMosquitto(Mosquitto):
    """mosquitto on :data:`SHIPPED_CONFIG` as shipped, but for its ports (free ones on
    127.0.0.1) and its files (those given, and `workdir`): devices log in at `url`, the
    service at `service_url`. Its limits are the shipped ones: the queue and in-flight
    options of :class:`Mosquitto` do not apply."""

    def __init__(
        self,
        workdir: Path,
        *,
        password_file: Path,
        service_password_file: Path,
        acl_file: Path,
        **options: Any,
    ) -> None:
        super().__init__(workdir, password_file=password_file, acl_file=acl_file, **options)
        self.service_password_file = service_password_file
        self.service_port: int | None = None

    @property
    def service_url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` of the service listener."""
        self._bound_port()
        return f"mqtt://{self.host}:{self.service_port}"

    def config_text(self, port: int) -> str:
        """The shipped file with its ports, files and paths replaced; every one of them must
        be there, so that a change to the shipped file cannot leave this one behind."""
        if self.port is None:  # a first start: a port refused by bind is chosen again
            self.service_port = free_port(self.host)
        etc, var = "/etc/mosquitto/", "/var/lib/mosquitto/"
        replacements = {
            "listener 1883": f"listener {port} {self.host}",
            "listener 1884": f"listener {self.service_port} {self.host}",
            f"password_file {etc}twin-service.passwd": f"password_file {self.password_file}",
            f"password_file {etc}twin-service-service.passwd": (
                f"password_file {self.service_password_file}"
            ),
            f"acl_file {etc}twin-service.acl": f"acl_file {self.acl_file}",
            f"persistence_location {var}": f"persistence_location {self.persistence_dir}/",
        }
        lines, used = [], set()
        for line in SHIPPED_CONFIG.read_text().splitlines():
            if line.strip() in replacements:
                used.add(line.strip())
                line = replacements[line.strip()]
            lines.append(line)
        if missing := set(replacements) - used:
            raise AssertionError(f"{SHIPPED_CONFIG} no longer has {sorted(missing)}")
        lines.extend(self._harness_lines())
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"
