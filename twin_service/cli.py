"""Command line: ``twin-service serve | version | devices ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from twin_service import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twin-service", description="Digital twin state service")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP/WebSocket service (and embedded broker)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8080)")
    serve.add_argument("--data-dir", type=Path, help="directory for the database and tokens")
    serve.add_argument("--config", type=Path, help="TOML settings file")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub.add_parser("version", help="print the version")
    try:
        from connectivity.cli import add_subcommands
    except ImportError:  # connectivity is optional only while it is being built
        pass
    else:
        add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "serve":
        return _serve(args)
    handler = getattr(args, "handler", None)
    if handler is None:
        print(f"unknown command {args.command}", file=sys.stderr)
        return 2
    result: int = handler(args)
    return result


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from twin_service.api.app import create_app
    from twin_service.settings import load_settings

    try:
        settings = load_settings(
            args.config,
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            log_level=args.log_level,
        )
    except (ValidationError, ValueError) as exc:
        print(f"twin-service: invalid settings: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
