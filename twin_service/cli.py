"""Command line: ``twin-service serve | version | devices | backup ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twin_service import __version__, hangup


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not with the module: main holds SIGHUP before (twin_service.hangup).
    from connectivity.cli import add_subcommands as add_device_commands
    from connectivity.retire import add_subcommands as add_mqtt_commands
    from connectivity.simulate import add_subcommands as add_simulate_command
    from twin_service.index.cli import add_subcommands as add_index_commands
    from twin_service.store.backup import add_subcommands as add_backup_command
    from twin_service.store.restore_backup import add_subcommands as add_restore_command

    parser = argparse.ArgumentParser(prog="twin-service", description="Digital twin state service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP/WebSocket service (and embedded broker)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8080)")
    serve.add_argument("--data-dir", type=Path, help="directory for the database and tokens")
    serve.add_argument("--config", type=Path, help="TOML settings file")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub.add_parser("version", help="print the version")
    parser.add_argument(
        "--data-dir",
        dest="root_data_dir",
        metavar="DIR",
        type=Path,
        help="data directory, for every command that reads settings (serve, devices, backup, "
        "restore, index, mqtt); the same as --data-dir after the command",
    )
    parser.add_argument(
        "--config",
        dest="root_config",
        metavar="FILE",
        type=Path,
        help="TOML settings file, for the same commands; the same as --config after the command",
    )
    add_device_commands(sub)
    add_index_commands(sub)
    add_mqtt_commands(sub)
    add_simulate_command(sub)
    add_backup_command(sub)
    add_restore_command(sub)
    return parser


#: The options that may come before the command name, by their name after it.
_ROOT_OPTIONS = {"data_dir": "root_data_dir", "config": "root_config"}


def main(argv: list[str] | None = None) -> int:
    # Until the service's lifespan takes it over; any other command gets it back at once.
    hangup.hold()
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_root_options(parser, args)
    if args.command != "serve":
        hangup.release()
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "serve":
        return _serve(args)
    handler = getattr(args, "handler", None)
    if handler is None:
        print(f"unknown command {args.command}", file=sys.stderr)
        return 2
    if args.command == "devices":
        from twin_service.settings import settings_for_command

        settings = settings_for_command(args.config, data_dir=args.data_dir)
        if settings is None:
            return 2
        device_result: int = handler(args, settings)
        return device_result
    result: int = handler(args)
    return result


def _apply_root_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--data-dir``/``--config`` before the command name mean what they mean after it.

    Once only ``devices`` read them and every other command ignored them, serving or backing
    up the default ./data instead. A command that reads no settings (``version``,
    ``simulate``) refuses them, as does a command given two different values.
    """
    reads_settings = args.command == "devices" or hasattr(args, "config")
    for name, root_name in _ROOT_OPTIONS.items():
        given = getattr(args, root_name)
        option = "--" + name.replace("_", "-")
        if given is None:
            setattr(args, name, getattr(args, name, None))
        elif not reads_settings:
            parser.error(f"{option} does not apply to {args.command}")
        elif getattr(args, name, None) not in (None, given):
            parser.error(f"{option} given twice, before and after {args.command}: give it once")
        else:
            setattr(args, name, given)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from twin_service import logs
    from twin_service.api.app import create_app
    from twin_service.api.http_protocol import JsonErrorHttpProtocol
    from twin_service.api.websocket_protocol import BoundedWebSocketProtocol
    from twin_service.budget import ByteBudget
    from twin_service.collector import tune_gc
    from twin_service.listen import BoundServer, bind_http, http_port_problem
    from twin_service.open_files import raise_open_files_limit
    from twin_service.settings import settings_for_command

    settings = settings_for_command(
        args.config,
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        log_level=args.log_level,
    )
    if settings is None:
        return 2
    logs.configure(settings.log_level)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app = create_app(settings)  # reads the tokens file, or writes the admin token
    except (OSError, ValueError) as exc:
        print(f"twin-service cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        sockets = bind_http(settings.host, settings.port)
    except OSError as exc:
        print(f"twin-service cannot start: {http_port_problem(settings, exc)}", file=sys.stderr)
        return 3
    tune_gc(settings.gc_thresholds)
    raise_open_files_limit()
    # One bound for what clients are still sending, over HTTP and WebSocket alike.
    incoming = ByteBudget(settings.limits.incoming_bytes)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        http=JsonErrorHttpProtocol.bounded(
            settings.limits.max_head_bytes,
            settings.limits.read_timeout_seconds,
            incoming,
            app.requests,
        ),
        ws=BoundedWebSocketProtocol.bounded(incoming),
        ws_per_message_deflate=settings.stream.websocket_deflate,
        # uvicorn's default is 16 MiB: a message is parsed whole, so the REST body limit
        # applies to it too (a larger one closes the socket with 1009, message too big).
        ws_max_size=settings.limits.max_request_bytes,
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
    )
    server = BoundServer(config)
    # A start that fails after serving began (the store came back refusing, say; see
    # api.app) ends the server as a shutdown would, and exits like a failed start.
    app.state.end_serving = lambda: setattr(server, "should_exit", True)
    server.run_on(sockets, lambda: getattr(app.state, "startup_failure", None) is not None)
    failure = getattr(app.state, "startup_failure", None)
    if failure is not None:  # at start, or after serving began
        print(failure, file=sys.stderr)
        return 3
    if not server.started:
        return 3  # a fault the lifespan did not recognise: uvicorn logged its traceback
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
