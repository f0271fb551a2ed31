"""The ``devices`` subcommands, parsed the way the main CLI will parse them."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from connectivity.cli import add_subcommands
from connectivity.credentials import CredentialStore
from twin_service.settings import Settings


def run(data_dir: Path, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="twin-service")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    code: int = args.handler(args, Settings(data_dir=data_dir), out)
    return code, out.getvalue()


def test_devices_commands(tmp_path: Path) -> None:
    code, text = run(tmp_path, "devices", "add", "org.acme:pump-1")
    assert code == 0 and "username: org.acme%3Apump-1" in text
    password = text.split("password: ")[1].split()[0]
    assert CredentialStore.in_data_dir(tmp_path).verify("org.acme:pump-1", password)
    assert run(tmp_path, "devices", "add", "org.acme:pump-1")[0] == 1
    code, text = run(tmp_path, "devices", "rotate", "org.acme:pump-1")
    assert code == 0 and password not in text
    code, text = run(tmp_path, "devices", "list", "--json")
    assert [row["twinId"] for row in json.loads(text)] == ["org.acme:pump-1"]
    code, _ = run(
        tmp_path,
        "devices",
        "export-mosquitto",
        "--password-file",
        str(tmp_path / "pw"),
        "--acl-file",
        str(tmp_path / "acl"),
        "--service-user",
        "service",
    )
    assert code == 0
    acl = (tmp_path / "acl").read_text().splitlines()
    assert "topic read twins/org.acme:pump-1/#" in acl
    assert "topic write twins/org.acme:pump-1/reported/update" in acl
    assert (tmp_path / "pw").read_text().startswith("org.acme%3Apump-1:$7$")
    assert run(tmp_path, "devices", "remove", "org.acme:pump-1")[0] == 0
    assert run(tmp_path, "devices", "remove", "org.acme:pump-1")[0] == 1


def test_export_writes_the_service_password_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export = ["devices", "export-mosquitto", "--password-file", str(tmp_path / "pw")]
    export += ["--acl-file", str(tmp_path / "acl"), "--service-user", "service"]
    export += ["--service-password-file", str(tmp_path / "service-pw")]
    code, _ = run(tmp_path, *export)  # the password file needs the password
    assert code == 2 and not (tmp_path / "service-pw").exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    code, text = run(tmp_path, *export, "--service-password-stdin")
    assert code == 0 and str(tmp_path / "service-pw") in text
    assert (tmp_path / "service-pw").read_text().startswith("service:$7$")
