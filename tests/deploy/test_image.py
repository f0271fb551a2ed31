"""The container image's recipe, checked without a container engine.

CI machines have no Docker engine, so the image is never built there. These tests take the
Dockerfile at its word instead: they install what its ``COPY`` lines copy (and nothing
else from the checkout) the way its ``RUN pip install`` does, start the installed
``twin-service`` with the image's command and settings, and use it over HTTP.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.deploy.test_manifests import env_names
from tests.servers.process import free_port, wait_healthy
from twin_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined."""
    out: list[tuple[str, str]] = []
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_image_settings_exist_and_exposed_ports_are_the_defaults() -> None:
    env = image_env()
    assert env, "the image configures nothing"
    assert set(env) <= env_names(), f"unknown settings: {sorted(set(env) - env_names())}"
    # Inside a container, loopback is unreachable from outside: both servers must listen
    # on every interface, or EXPOSE and `docker run -p` do nothing.
    assert env["TWIN_HOST"] == "0.0.0.0"
    assert env["TWIN_MQTT__EMBEDDED_HOST"] == "0.0.0.0"
    exposed = {int(p) for word, rest in instructions() if word == "EXPOSE" for p in rest.split()}
    defaults = Settings()
    assert exposed == {defaults.port, defaults.mqtt.embedded_port}


def test_installed_extras_exist() -> None:
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    runs = [rest for word, rest in instructions() if word == "RUN" and "pip install" in rest]
    assert runs
    named = {e for run in runs for e in _extras(run)}
    assert named == {"mongodb", "elasticsearch"} and named <= extras


def _extras(run: str) -> set[str]:
    for arg in shlex.split(run):
        if arg.startswith(".[") and arg.endswith("]"):
            return set(arg[2:-1].split(","))
    return set()


def test_copied_files_install_and_serve(tmp_path: Path) -> None:
    # The build context as the image sees it: only what COPY brings in.
    context = tmp_path / "context"
    context.mkdir()
    for word, rest in instructions():
        if word == "COPY":
            *sources, _target = rest.split()
            for source in sources:
                _copy(ROOT / source, context / source)
    site = tmp_path / "site"
    # As the image's `pip install .`, without the dependencies (the test environment has
    # them) and into a directory of its own, so nothing is imported from the checkout.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWIN_")}
    env.update(image_env())
    port, mqtt_port = free_port(), free_port()
    env.update(
        {
            "PYTHONPATH": str(site),
            "TWIN_DATA_DIR": str(tmp_path / "data"),
            # The image's 0.0.0.0, narrowed for a test machine.
            "TWIN_HOST": "127.0.0.1",
            "TWIN_PORT": str(port),
            "TWIN_MQTT__EMBEDDED_HOST": "127.0.0.1",
            "TWIN_MQTT__EMBEDDED_PORT": str(mqtt_port),
        }
    )
    where = subprocess.run(
        [sys.executable, "-c", "import twin_service, search, connectivity; print(search.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    command = _entrypoint_and_cmd()
    assert command == ["twin-service", "serve"]
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(site / "bin" / command[0]), *command[1:]],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_healthy(proc, url, 60, "installed service", log_path), log_path.read_text()
        token = (tmp_path / "data" / "admin-token").read_text().strip()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as api:
            ready = api.get("/ready")
            assert ready.status_code == 200, ready.text
            mqtt = ready.json()["checks"]["mqtt"]
            assert (mqtt["status"], mqtt["broker"]) == ("up", "embedded"), ready.text
            put = api.put("/api/v1/twins/org.image:pump", json={"desired": {"on": True}})
            assert put.status_code == 201, put.text
            got = api.get("/api/v1/twins/org.image:pump").json()
            assert got["delta"] == {"on": True} and got["revision"] == 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the installed service did not stop on SIGTERM")
    # uvicorn shuts down gracefully, then re-raises the signal (exit status 143 in a shell).
    log = log_path.read_text()
    assert proc.returncode in (0, -signal.SIGTERM), log[-3000:]
    assert "Application shutdown complete" in log, log[-3000:]


def _entrypoint_and_cmd() -> list[str]:
    parts: dict[str, list[str]] = {}
    for word, rest in instructions():
        if word in ("ENTRYPOINT", "CMD"):
            parts[word] = json.loads(rest)
    return [*parts.get("ENTRYPOINT", []), *parts.get("CMD", [])]


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(
            source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        )
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
