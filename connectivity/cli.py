"""``twin-service devices ...``: manage device credentials in the data directory.

The main CLI calls :func:`add_subcommands` with its subparsers and, for the parsed namespace,
``args.handler(args, settings)`` which returns the process exit code: the settings the
service runs with (``--config``, ``TWIN_*``), for its data directory and topic prefix.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from connectivity.credentials import (
    CredentialError,
    CredentialStore,
    check_service_user,
    mqtt_username,
)
from twin_service.auth import ADMIN_TOKEN_FILE
from twin_service.store.own_files import one_of, sqlite_files

if TYPE_CHECKING:
    from twin_service.settings import Settings


def add_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``devices`` command group to an ``argparse`` subparsers object."""
    devices: argparse.ArgumentParser = subparsers.add_parser(
        "devices", help="manage device MQTT credentials"
    )
    sub = devices.add_subparsers(dest="devices_command", required=True)

    add = sub.add_parser("add", help="create credentials; prints the password once")
    add.add_argument("twin_id")
    add.set_defaults(handler=_reporting(cmd_add))

    rotate = sub.add_parser("rotate", help="replace a password; prints the new one once")
    rotate.add_argument("twin_id")
    rotate.set_defaults(handler=_reporting(cmd_rotate))

    remove = sub.add_parser("remove", help="delete a device's credentials")
    remove.add_argument("twin_id")
    remove.set_defaults(handler=_reporting(cmd_remove))

    lst = sub.add_parser("list", help="list devices with credentials")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(handler=_reporting(cmd_list))

    export = sub.add_parser("export-mosquitto", help="write a mosquitto password file and ACL")
    export.add_argument("--password-file", type=Path, required=True)
    export.add_argument("--acl-file", type=Path, required=True)
    export.add_argument("--service-user", required=True, type=_service_user)
    export.add_argument(
        "--topic-prefix",
        help="the devices' topics (default: mqtt.topic_prefix of the settings, as the service)",
    )
    export.add_argument(
        "--service-password-stdin",
        action="store_true",
        help="read the service account's password from stdin and include its hash",
    )
    export.add_argument(
        "--service-password-file",
        type=Path,
        help="write the service account's password hash to this file instead (the password "
        "file of the service listener; needs --service-password-stdin)",
    )
    export.set_defaults(handler=_reporting(cmd_export_mosquitto))
    return devices


def _service_user(text: str) -> str:
    try:
        return check_service_user(text)
    except CredentialError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_secret(twin_id: str, password: str, out: TextIO) -> None:
    print(f"twin:     {twin_id}", file=out)
    print(f"username: {mqtt_username(twin_id)}", file=out)
    print(f"password: {password}", file=out)
    print("The password is shown only now; it is stored hashed.", file=out)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


Handler = Callable[[argparse.Namespace, "Settings", TextIO], int]


def _reporting(command: Handler) -> Handler:
    """``command``, with a credentials file it cannot use (damaged, unreadable, unwritable)
    reported in one line and exit status 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
        try:
            return command(args, settings, out)
        except (CredentialError, OSError) as exc:
            return _fail(exc)

    return run


def cmd_add(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    """``devices add TWIN_ID``."""
    _print_secret(
        args.twin_id, CredentialStore.in_data_dir(settings.data_dir).add(args.twin_id), out
    )
    return 0


def cmd_rotate(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    """``devices rotate TWIN_ID``."""
    password = CredentialStore.in_data_dir(settings.data_dir).rotate(args.twin_id)
    _print_secret(args.twin_id, password, out)
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    """``devices remove TWIN_ID``."""
    if not CredentialStore.in_data_dir(settings.data_dir).remove(args.twin_id):
        return _fail(CredentialError(f"device {args.twin_id!r} has no credentials"))
    print(f"removed {args.twin_id}", file=out)
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout) -> int:
    """``devices list [--json]``."""
    creds = CredentialStore.in_data_dir(settings.data_dir).list()
    if args.json:
        rows = [
            {
                "twinId": c.twin_id,
                "username": c.username,
                "created": c.created,
                "rotated": c.rotated,
            }
            for c in creds
        ]
        print(json.dumps(rows, indent=2), file=out)
    else:
        for c in creds:
            print(f"{c.twin_id}\t{c.username}\t{c.created}\t{c.rotated or '-'}", file=out)
    return 0


def cmd_export_mosquitto(
    args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout
) -> int:
    """``devices export-mosquitto --password-file P --acl-file A --service-user U``."""
    if args.service_password_file is not None and not args.service_password_stdin:
        return _usage("--service-password-file needs --service-password-stdin (the password)")
    outputs = {
        "--password-file": args.password_file,
        "--acl-file": args.acl_file,
        "--service-password-file": args.service_password_file,
    }
    refusal = _refuse_outputs({k: v for k, v in outputs.items() if v is not None}, settings)
    if refusal is not None:
        return _usage(refusal)
    service_password = sys.stdin.readline().rstrip("\n") if args.service_password_stdin else None
    if service_password == "":  # stdin was empty, or its first line was
        return _usage("--service-password-stdin: the password read from stdin is empty")
    try:
        CredentialStore.in_data_dir(settings.data_dir).write_mosquitto_files(
            args.password_file,
            args.acl_file,
            args.service_user,
            # The service's own: with the built-in one, the ACL denied devices every topic
            # a service with another prefix used.
            settings.mqtt.topic_prefix if args.topic_prefix is None else args.topic_prefix,
            service_password=service_password,
            service_password_path=args.service_password_file,
        )
    except ValueError as exc:  # a topic prefix without {twinId} (CredentialError is one too)
        return _fail(exc)
    names = ", ".join(str(path) for path in outputs.values() if path is not None)
    print(f"wrote {names}; reload mosquitto (SIGHUP)", file=out)
    return 0


def _usage(problem: str) -> int:
    """``export-mosquitto`` given options it cannot use: exit status 2, as argparse's own."""
    print(f"twin-service devices export-mosquitto: {problem}", file=sys.stderr)
    return 2


def _refuse_outputs(outputs: dict[str, Path], settings: Settings) -> str | None:
    """Why the files named by ``outputs`` (option: path) must not be written, or None.

    Each is replaced: named the twin store or the credentials, exit 0 left a running
    service with a database "disk image malformed" at its next start, or every device
    refused; two options naming one file left only the later one's text there.
    """
    credentials = CredentialStore.in_data_dir(settings.data_dir)
    own = {credentials.path: "the device credentials", credentials.lock_path: "their lock"}
    database = settings.data_dir / settings.sqlite.file_name
    own |= {path: "the twin store" for path in sqlite_files(database)}
    own[settings.data_dir / ADMIN_TOKEN_FILE] = "the admin token"
    if settings.auth.tokens_file is not None:
        own[settings.auth.tokens_file] = "the tokens file"
    earlier: dict[Path, str] = {}
    for option, path in outputs.items():
        found = one_of(path, own)
        if found is not None:
            return (
                f"{option}: {path} is {own[found]} ({found}); writing there would destroy "
                "it: name another file"
            )
        same = one_of(path, earlier)
        if same is not None:
            return f"{option}: {path} is the file of {earlier[same]} ({same}); name another file"
        earlier[path] = option
    return None
