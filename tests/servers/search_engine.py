"""A real Elasticsearch node for tests: one node on a free loopback port, data in a temp dir.

`scripts/servers/prepare-search-engine` downloads and unpacks the distribution (the
"integ-test-zip" from Maven Central) into `.cache/servers/elasticsearch/` and records the JDK to
run it with and, when it ran as root, the unprivileged user to run it as (Elasticsearch refuses
to run as root). `unavailable_reason()` says why a test cannot have one.

That distribution has the core search features the index needs (`nested` mappings and queries,
`bool`/`term`/`terms`/`range`/`prefix`/`wildcard`/`exists`, sorts with `search_after` including
nested sorts, point in time, aggregations, `_bulk`, `_count`, `refresh`) but no scripting
(painless), no `_delete_by_query`/`_update_by_query`/`_reindex`, no analysis-common analyzers,
and answers `GET /` with 405: health checks use `GET /_cluster/health`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.servers.process import REPO_ROOT, ServerStartError, log_tail

CACHE_DIR = REPO_ROOT / ".cache" / "servers" / "elasticsearch"
PREPARE_SCRIPT = "scripts/servers/prepare-search-engine"
PREPARE_HINT = f"not prepared: run {PREPARE_SCRIPT}"

# The Python client rejects responses without this header (UnsupportedProductError).
PRODUCT_HEADER = "X-Elastic-Product"


@dataclass(frozen=True)
class Installation:
    """A prepared distribution, as recorded by prepare-search-engine."""

    home: Path
    java_home: Path
    version: str
    run_as: str | None
    """Unprivileged user to run the node as; None runs it as the current user."""


def _read(name: str) -> str:
    return (CACHE_DIR / name).read_text().strip()


def find_installation() -> Installation | None:
    """The prepared installation, or None when `unavailable_reason()` has something to say."""
    return None if unavailable_reason() else _installation()


def _installation() -> Installation:
    run_as = _read("run-as")
    return Installation(
        home=Path(_read("es-home")),
        java_home=Path(_read("java-home")),
        version=_read("version"),
        run_as=run_as or None,
    )


def unavailable_reason() -> str | None:
    """Why no search engine can start here (with how to fix it), or None when one can."""
    try:
        installation = _installation()
    except OSError:
        return PREPARE_HINT
    if not (installation.home / "bin" / "elasticsearch").is_file():
        return PREPARE_HINT
    if not (installation.java_home / "bin" / "java").is_file():
        return f"JDK {installation.java_home} is gone: run {PREPARE_SCRIPT}"
    if os.geteuid() == 0 and installation.run_as is None:
        # Elasticsearch refuses to run as root; the script, run as root, sets up a user.
        return f"prepared by a non-root user, tests run as root: run {PREPARE_SCRIPT} as root"
    if installation.run_as is not None:
        if os.geteuid() != 0:
            return f"prepared to run as user {installation.run_as}, which needs root"
        try:
            pwd.getpwnam(installation.run_as)
        except KeyError:
            return f"user {installation.run_as} is missing: run {PREPARE_SCRIPT}"
    return None


class SearchEngine:
    """One Elasticsearch node on 127.0.0.1, started with `start()` and always ended by `stop()`.

    Each start gets a fresh temp directory (configuration copy, `data/`, `logs/`, and
    `output.log` with the node's console output) that `stop()` removes. The node picks its own
    ports (port 0) and writes them to its ports file, so parallel nodes never race for a port.
    Usable as a context manager.
    """

    kind = "elasticsearch"
    host = "127.0.0.1"

    def __init__(
        self,
        installation: Installation | None = None,
        *,
        heap_mb: int = 512,
        start_timeout: float = 180.0,
        keep_workdir: bool = False,
    ) -> None:
        resolved = installation or find_installation()
        if resolved is None:
            raise FileNotFoundError(f"elasticsearch {unavailable_reason()}")
        self.installation = resolved
        self.heap_mb = heap_mb
        self.start_timeout = start_timeout
        self.keep_workdir = keep_workdir
        self.workdir: Path | None = None
        self.port: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def version(self) -> str:
        return self.installation.version

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("search engine not started")
        return f"http://{self.host}:{self.port}"

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> SearchEngine:
        """Start the node and wait until the cluster is at least yellow.

        Raises ServerStartError with the tail of the node's output when it exits or is not
        healthy within `start_timeout` seconds; the node is stopped in that case.
        """
        if self.running():
            raise RuntimeError(f"already running at {self.url}")
        workdir = self._make_workdir()
        logs = workdir / "logs"
        argv = [
            str(self.installation.home / "bin" / "elasticsearch"),
            *(f"-E{key}={value}" for key, value in self._settings(workdir).items()),
        ]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(workdir),
            "ES_JAVA_HOME": str(self.installation.java_home),
            "ES_PATH_CONF": str(workdir / "config"),
            "ES_TMPDIR": str(workdir / "tmp"),
            "ES_JAVA_OPTS": f"-Xms{self.heap_mb}m -Xmx{self.heap_mb}m",
        }
        run_as = self.installation.run_as
        output = workdir / "output.log"
        with output.open("ab") as out:
            self._popen = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                user=run_as,
                group=run_as,
                extra_groups=[] if run_as else None,
                # Own process group: the launcher JVM starts the server JVM as a child, and
                # stop() signals both; a Ctrl-C aimed at pytest reaches neither.
                process_group=0,
            )
        _live.add(self)
        try:
            self._wait_healthy(logs / "http.ports", output)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the node's process group, SIGKILL it after `timeout`; remove the temp dir.

        Safe to call at any time, more than once. Returns the launcher's exit code.
        """
        popen, self._popen = self._popen, None
        _live.discard(self)
        code: int | None = None
        if popen is not None:
            deadline = time.monotonic() + timeout
            _signal_group(popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = popen.wait(timeout)
            # The launcher may exit before the server JVM it started has closed its indices.
            while _signal_group(popen.pid, 0) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal_group(popen.pid, signal.SIGKILL)
            if code is None:
                code = popen.wait(10)
        workdir, self.workdir = self.workdir, None
        self.port = None
        if workdir is not None and not self.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return code

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The node stopped (SIGSTOP of its process group) for the ``with`` block, then
        continued: its connections stay open and nothing answers, as in a long pause of
        its JVM or a network partition."""
        assert self._popen is not None, "the node is not running"
        _signal_group(self._popen.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            _signal_group(self._popen.pid, signal.SIGCONT)

    def __enter__(self) -> SearchEngine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _make_workdir(self) -> Path:
        # Not pytest's tmp_path: its parents are private to the user running pytest.
        workdir = Path(tempfile.mkdtemp(prefix="twin-es-"))
        self.workdir = workdir
        shutil.copytree(self.installation.home / "config", workdir / "config")
        for name in ("data", "logs", "tmp"):
            (workdir / name).mkdir()
        if self.installation.run_as is not None:
            user = pwd.getpwnam(self.installation.run_as)
            for path in [workdir, *workdir.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        return workdir

    def _settings(self, workdir: Path) -> dict[str, str]:
        return {
            "cluster.name": "twin-test",
            "node.name": "twin-test",
            "discovery.type": "single-node",
            "network.host": self.host,
            "http.port": "0",
            "transport.port": "0",
            # Writes logs/http.ports once the HTTP server is bound.
            "node.portsfile": "true",
            "path.data": str(workdir / "data"),
            "path.logs": str(workdir / "logs"),
            "xpack.security.enabled": "false",
            # Test machines often have little free disk; never turn indices read-only.
            "cluster.routing.allocation.disk.threshold_enabled": "false",
            # Lets tests clean up with wildcard index deletes.
            "action.destructive_requires_name": "false",
        }

    def _wait_healthy(self, ports_file: Path, output: Path) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = "no ports file yet"
        while True:
            if self._popen is None or self._popen.poll() is not None:
                code = None if self._popen is None else self._popen.returncode
                raise ServerStartError(
                    f"elasticsearch exited with code {code} before it was ready\n{log_tail(output)}"
                )
            if self.port is None and ports_file.exists():
                self.port = _first_port(ports_file)
            if self.port is not None:
                try:
                    _check_health(self.url)
                    return
                except (OSError, ValueError) as exc:
                    last_error = str(exc)
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"elasticsearch not healthy after {self.start_timeout:.0f}s "
                    f"({last_error})\n{log_tail(output)}"
                )
            time.sleep(0.2)


def _first_port(ports_file: Path) -> int | None:
    # One "host:port" per line; the file may be caught half-written.
    for line in ports_file.read_text().splitlines():
        _, _, port = line.strip().rpartition(":")
        if port.isdigit():
            return int(port)
    return None


# Loopback traffic must not follow an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _check_health(url: str) -> None:
    """Raise unless the cluster is yellow or green and speaks like Elasticsearch."""
    request = urllib.request.Request(
        f"{url}/_cluster/health?wait_for_status=yellow&timeout=1s", method="GET"
    )
    try:
        with _DIRECT.open(request, timeout=5) as response:
            body = json.load(response)
            product = response.headers.get(PRODUCT_HEADER)
    except urllib.error.HTTPError as exc:
        raise ValueError(f"health check answered {exc.code}") from exc
    if body.get("status") not in {"yellow", "green"}:
        raise ValueError(f"cluster status {body.get('status')!r}")
    if product != "Elasticsearch":
        raise ValueError(f"{PRODUCT_HEADER} header is {product!r}, the client would refuse it")


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to process group `pgid`; False when the group has no process left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


_live: weakref.WeakSet[SearchEngine] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for engine in list(_live):
        engine.stop(timeout=5.0)
