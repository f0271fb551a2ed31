"""``twin-service mqtt retire CLIENT_ID``: end a removed replica's broker session, losing
nothing it holds.

After scaling down, the removed replicas' persistent sessions stay on the broker, still
members of the shared subscriptions: the broker keeps queueing a share of the device
messages for them (see docs/scaling.md). This runs the service's parts (store, index,
change feed, MQTT sync; no HTTP) under that client id, handles what its session queued,
and ends the session (:meth:`connectivity.sync.MqttSync.retire`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twin_service.settings import Settings


def add_subcommands(subparsers: Any) -> None:
    """Add ``mqtt retire`` to the ``twin-service`` sub-command parsers."""
    mqtt = subparsers.add_parser("mqtt", help="manage the service's MQTT sessions")
    sub = mqtt.add_subparsers(dest="mqtt_command", required=True)
    retire = sub.add_parser(
        "retire",
        help="handle what a removed replica's session queued, then end the session",
    )
    retire.add_argument("client_id", type=_client_id, help="the removed replica's mqtt.client_id")
    retire.add_argument("--config", type=Path, help="TOML settings file")
    retire.add_argument("--data-dir", type=Path, help="directory of the database")
    retire.add_argument(
        "--quiet-seconds",
        type=_seconds,
        default=5.0,
        help="done when no queued message has come for this long (5)",
    )
    retire.set_defaults(handler=run_retire)


def _client_id(text: str) -> str:
    # An unset shell variable ("$REPLICA") ended in a traceback: a persistent session
    # needs a client id, and an empty one is the broker's to assign.
    if not text:
        raise argparse.ArgumentTypeError("the client id is empty")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    # 'nan' never ended the wait (no time is ever at least nan); 0 or less ended it at once.
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    return value


def run_retire(args: argparse.Namespace) -> int:
    """0 when the session was ended, 2 on bad settings, 1 when the broker or store failed."""
    from twin_service import logs
    from twin_service.errors import TwinServiceError
    from twin_service.settings import settings_for_command

    settings = settings_for_command(args.config, data_dir=args.data_dir)
    if settings is None:
        return 2
    if not settings.mqtt_url or not settings.mqtt.enabled:
        print("twin-service: mqtt retire needs an external broker (mqtt_url)", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    mqtt = settings.mqtt.model_copy(update={"client_id": args.client_id})
    settings = settings.model_copy(update={"mqtt": mqtt})
    try:
        handled = asyncio.run(_retire(settings, args.quiet_seconds))
    except TwinServiceError as exc:
        print(f"twin-service: retire failed: {exc.message}", file=sys.stderr)
        return 1
    print(f"ended the MQTT session {args.client_id} after handling {handled} queued messages")
    return 0


async def _retire(settings: Settings, quiet_seconds: float) -> int:
    from connectivity.sync import MqttSync
    from twin_service.api.app import start_service
    from twin_service.auth import TokenRegistry

    async with AsyncExitStack() as stack:
        # MQTT sync alone, and retiring from the start: the deltas and the expiry of
        # desired values are for the replicas that stay to keep.
        sync = MqttSync(retiring=True)
        # Only a store that exists: a mistyped --data-dir created an empty one, and the
        # session's queued reports, handled against it, were lost for the real store.
        await start_service(
            settings, TokenRegistry([], disabled=True), stack, [sync], must_exist=True
        )
        return await sync.retire(settings.mqtt.connect_timeout_seconds, quiet_seconds)
