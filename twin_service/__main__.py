"""``python -m twin_service`` and the ``twin-service`` command."""

from __future__ import annotations


def run() -> int:
    try:
        # Imported here, inside the catch: a Ctrl-C can land anywhere in the second or so
        # before a command sets its own handler (imports, parsing, settings).
        from twin_service.cli import main

        return main()
    except KeyboardInterrupt:
        # What a command that handles Ctrl-C itself answers: 130, and no traceback.
        return 130


if __name__ == "__main__":
    raise SystemExit(run())
