"""Certificates for the TLS tests, made with the openssl command."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.servers.require import require_server


def self_signed(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        require_server(
            "openssl", "the TLS tests make their certificates with it: apt install openssl"
        )
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    new = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run([*new, *files, *subject], check=True, capture_output=True)
    return cert, key
