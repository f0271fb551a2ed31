"""Command line: ``twin-service index rebuild`` (reindex every twin into Elasticsearch).

Wired into ``twin_service.cli`` with :func:`add_subcommands`; also runnable on its own as
``python -m twin_service.index.cli rebuild``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from twin_service.cli_numbers import at_least
from twin_service.errors import StoreMissing, TwinServiceError

if TYPE_CHECKING:
    from twin_service.index.elasticsearch import FillResult


def add_subcommands(subparsers: Any) -> None:
    """Add ``index rebuild`` to the ``twin-service`` sub-command parsers."""
    index = subparsers.add_parser("index", help="manage the external search index")
    sub = index.add_subparsers(dest="index_command", required=True)
    rebuild = sub.add_parser(
        "rebuild", help="reindex every twin from the store into a fresh index, then switch"
    )
    rebuild.add_argument("--config", type=Path, help="TOML settings file")
    rebuild.add_argument("--data-dir", type=Path, help="directory of the database")
    rebuild.add_argument(
        # At least 1: a page of 0 twins read nothing, and the rebuild then switched the
        # alias to an empty index and deleted the full one.
        "--page-size",
        type=at_least(1, int),
        default=500,
        help="twins read per page (at least 1)",
    )
    rebuild.add_argument(
        "--allow-empty",
        action="store_true",
        help="replace an index that holds twins even when the store has none",
    )
    rebuild.set_defaults(handler=run_rebuild)


class ProgressLine:
    """Live ``done/total, twins/s`` on a terminal (one line a second otherwise)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._start = time.monotonic()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self._tty and now - self._last < 1.0 and done < total:
            return
        self._last = now
        rate = done / max(now - self._start, 1e-9)
        text = f"indexed {done:,}/{total:,} twins ({rate:,.0f} twins/s)"
        self._out.write(f"\r{text}\x1b[K" if self._tty else text + "\n")
        self._out.flush()

    def finish(self, indexed: int, refused: int) -> None:
        elapsed = time.monotonic() - self._start
        end = "\n" if self._tty else ""
        twins = f"{indexed:,} of {indexed + refused:,}" if refused else f"{indexed:,}"
        self._out.write(f"{end}rebuilt the index with {twins} twins in {elapsed:.1f}s\n")
        if refused:
            self._out.write(
                f"twin-service: {refused:,} refused (each named in the log above, with the "
                "reason): searches do not find them\n"
            )


def run_rebuild(args: argparse.Namespace) -> int:
    """Handler of ``index rebuild``: 0 on success, 2 on bad settings, 3 when another
    rebuild of the index runs, 1 on failure or when some twins were refused (the alias then
    still moved to the new index), 128 + the signal's number when stopped by one before the
    alias moved; stopped after, it ends the rebuild and answers as one not stopped."""
    from twin_service import logs
    from twin_service.settings import settings_for_command

    settings = settings_for_command(args.config, data_dir=args.data_dir)
    if settings is None:
        return 2
    logs.configure(settings.log_level)
    if settings.search != "elasticsearch":
        print("twin-service: index rebuild needs search=elasticsearch", file=sys.stderr)
        return 2
    from twin_service.index.elasticsearch import RebuildRunning

    progress = ProgressLine(sys.stderr)
    stopped: list[int] = []
    switched: list[tuple[str, FillResult]] = []
    try:
        result = asyncio.run(
            _rebuild(settings, progress, args.page_size, args.allow_empty, stopped, switched)
        )
    except (asyncio.CancelledError, KeyboardInterrupt):
        if not stopped and not switched:
            raise  # Ctrl-C: 130 (twin_service.__main__)
        name = signal.Signals(stopped[0] if stopped else signal.SIGINT).name
        if not switched:
            print(f"\ntwin-service: rebuild stopped by {name}", file=sys.stderr)
            return 128 + stopped[0]
        # Too late to stop: the alias was on the new index, the old one to delete. The
        # rebuild ended as it would have (its catch-up, the old index deleted).
        target, result = switched[0]
        print(
            f"\ntwin-service: {name} came after the alias moved to {target}: "
            "the rebuild ended first",
            file=sys.stderr,
        )
    except StoreMissing as exc:
        print(f"twin-service: {exc.message}", file=sys.stderr)
        return 1
    except RebuildRunning as exc:
        print(f"twin-service: {exc.message} {exc.description}", file=sys.stderr)
        return 3
    except TwinServiceError as exc:
        print(
            f"\ntwin-service: rebuild failed: {exc.message} {exc.description or ''}",
            file=sys.stderr,
        )
        if switched:
            print(f"twin-service: the alias had moved to {switched[0][0]}", file=sys.stderr)
        return 1
    progress.finish(result.indexed, result.refused)
    return 1 if result.refused else 0


async def _rebuild(
    settings: Any,
    progress: ProgressLine,
    page_size: int,
    allow_empty: bool,
    stopped: list[int],
    switched: list[tuple[str, FillResult]],
) -> FillResult:
    from twin_service.api.app import build_store
    from twin_service.index.elasticsearch import rebuild

    # SIGTERM (kill, timeout, systemd, a Job's end) and SIGHUP (a closed ssh session) end
    # the rebuild as Ctrl-C does, by cancelling it: killed outright, it left its lock, which
    # refused every later rebuild, and its half-filled index.
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None

    def stop(signum: int) -> None:
        stopped.append(signum)
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop, signum)
    store = build_store(settings, existing=True)
    await store.open()
    try:
        return await rebuild(
            settings,
            store,
            progress,
            page_size,
            allow_empty=allow_empty,
            on_switch=lambda target, result: switched.append((target, result)),
        )
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m twin_service.index.cli rebuild ...`` (the same as ``twin-service index``)."""
    parser = argparse.ArgumentParser(prog="twin-service")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["index", *(argv if argv is not None else sys.argv[1:])])
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
