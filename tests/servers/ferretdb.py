"""FerretDB (MongoDB wire protocol on SQLite) for the MongoDB store tests.

The server is our own small Go program (tests/servers/ferretdb/main.go) embedding FerretDB;
`scripts/servers/build-ferretdb` compiles it into `.cache/servers/ferretdb/`.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from tests.servers.process import (
    REPO_ROOT,
    LocalServer,
    ManagedProcess,
    ServerStartError,
    port_accepts,
)

BUILD_SCRIPT = REPO_ROOT / "scripts" / "servers" / "build-ferretdb"
DEFAULT_BINARY = REPO_ROOT / ".cache" / "servers" / "ferretdb" / "ferretdb"
BINARY_ENV = "TWIN_TEST_FERRETDB_BIN"
BUILD_HINT = "not built: run scripts/servers/build-ferretdb (needs Go >= 1.24 or network access)"


class FerretDBBuildError(RuntimeError):
    """scripts/servers/build-ferretdb failed although a Go toolchain is present."""


def go_available() -> bool:
    return shutil.which("go") is not None or Path("/usr/local/go/bin/go").exists()


@functools.cache
def ensure_binary() -> Path | None:
    """Path of an up-to-date FerretDB binary, building it when Go is available.

    `TWIN_TEST_FERRETDB_BIN` overrides everything. Without Go, an existing (possibly stale)
    build is used; None means there is nothing to run. Cached: one build check per process.
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        return Path(override)
    if go_available():
        result = subprocess.run(
            [BUILD_SCRIPT], capture_output=True, text=True, check=False, timeout=1800
        )
        if result.returncode != 0:
            raise FerretDBBuildError(f"{BUILD_SCRIPT.name} failed:\n{result.stderr[-4000:]}")
        return Path(result.stdout.strip().splitlines()[-1])
    return DEFAULT_BINARY if DEFAULT_BINARY.exists() else None


class FerretDB(LocalServer):
    """One FerretDB server on 127.0.0.1 with its SQLite files in `workdir/data`.

    The port is picked by the server itself at the first start (no race) and reused by
    `restart()`, which keeps the data. `output.log` holds the server's log.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        *,
        binary: Path | None = None,
        port: int | None = None,
        log_level: str = "warn",
        start_timeout: float = 30.0,
    ) -> None:
        resolved = binary or ensure_binary()
        if resolved is None:
            raise FileNotFoundError(f"ferretdb {BUILD_HINT}")
        self.binary = resolved
        self.workdir = workdir
        self.port = port
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.data_dir = workdir / "data"
        self.ready_file = workdir / "ready"
        self.output_path = workdir / "output.log"
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """``mongodb://127.0.0.1:PORT/``."""
        if self.port is None:
            raise RuntimeError("ferretdb has not been started")
        return f"mongodb://{self.host}:{self.port}/"

    def start(self) -> FerretDB:
        """Start the server and wait until it listens."""
        if self.running():
            raise RuntimeError(f"ferretdb already running on port {self.port}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        process = ManagedProcess(
            [
                self.binary,
                f"-listen={self.host}:{self.port or 0}",
                f"-data-dir={self.data_dir}",
                f"-ready-file={self.ready_file}",
                f"-log-level={self.log_level}",
            ],
            self.output_path,
        )
        process.start(env={"FERRETDB_TELEMETRY": "disable", "DO_NOT_TRACK": "1"})
        self._process = process
        try:
            process.wait_until(
                self._ready,
                self.start_timeout,
                f"ferretdb ({self.binary})",
                [self.output_path],
            )
        except ServerStartError:
            process.stop()
            self._process = None
            raise
        return self

    def _ready(self) -> bool:
        if not self.ready_file.exists():
            return False
        uri = self.ready_file.read_text().strip()
        # mongodb://127.0.0.1:PORT/
        self.port = int(uri.rsplit(":", 1)[1].rstrip("/"))
        return port_accepts(self.host, self.port)

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<FerretDB {self.host}:{self.port} {state} workdir={self.workdir}>"
