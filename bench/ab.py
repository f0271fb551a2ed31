"""CPU per request of two versions of the service, loaded at the same time (A/B).

On the machines we measure on, the speed of a core moves by tens of percent from one minute
to the next, so two versions measured one after the other differ by more than most changes
do. Here both run side by side: the service of a base revision (checked out into a temporary
git worktree) and the service of this working tree start together, get the same twins, and
one ``wrk`` each loads them during the same seconds. Both see the same machine, so the ratio
of their CPU per request (user + system of the service and its writer process, from
``/proc``) holds steady where their req/s do not. Each round starts both services afresh and
alternates which load starts first; the median ratio over rounds is the figure to quote.

    .venv/bin/python -m bench.ab --base HEAD~1                  # PATCH, 3 rounds of 10 s
    .venv/bin/python -m bench.ab --base main --method GET --rounds 5
    .venv/bin/python -m bench.ab --base HEAD --new-set TWIN_SQLITE__PAGE_SIZE=8192  # a setting

Needs ``wrk`` and git; Linux only (``/proc``). Settings for both sides: ``--set K=V``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT
from bench.rest import _WRK_SCRIPT, Result, Server, run_wrk, seed, twin_server
from tests.terminate import interrupt_on_sigterm


@dataclass
class Side:
    name: str
    root: Path
    server: Server | None = None


def worktree(revision: str, into: Path) -> Path:
    """``revision`` of this repository checked out (detached) at ``into``."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(into), revision],
        check=True,
    )
    return into


def one_round(
    sides: list[Side], work: Path, options: argparse.Namespace, first: int
) -> dict[str, tuple[Result, float]]:
    """Start both services, seed, warm up, load both at once; per side (result, CPU µs/req)."""
    try:
        for side in sides:
            data = Path(tempfile.mkdtemp(prefix=f"{side.name}-", dir=work))
            extra = options.new_set if side.name == "new" else []
            settings = dict(s.split("=", 1) for s in [*options.set, *extra])
            side.server = twin_server(data / "data", data / "log", settings, side.root).start()
            asyncio.run(seed(side.server.url, options.twins, 32))
        script = work / "ab.lua"
        script.write_text(_WRK_SCRIPT)
        order = sides[first:] + sides[:first]

        def load(seconds: float, out: dict[str, Result]) -> None:
            def go(side: Side) -> None:
                assert side.server is not None
                out[side.name] = run_wrk(
                    script,
                    side.server.url,
                    options.method,
                    options.twins,
                    options.connections,
                    seconds,
                )

            threads = [threading.Thread(target=go, args=(side,)) for side in order]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        load(options.warmup, {})
        before = {s.name: s.server.cpu_seconds() for s in sides if s.server}
        results: dict[str, Result] = {}
        load(options.seconds, results)
        after = {s.name: s.server.cpu_seconds() for s in sides if s.server}
        return {
            name: (result, (after[name] - before[name]) / max(1, result.requests) * 1e6)
            for name, result in results.items()
        }
    finally:
        for side in sides:
            if side.server is not None:
                side.server.stop()
                side.server = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--method", choices=("PATCH", "GET"), default="PATCH")
    parser.add_argument("--twins", type=int, default=2000, help="twins per service (2000)")
    parser.add_argument("--connections", type=int, default=16, help="per service (16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per round (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="per round (2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="TWIN_X=value, both sides")
    parser.add_argument(
        "--new-set", action="append", default=[], help="TWIN_X=value, the new side only"
    )
    options = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="twin-ab-") as tmp:
        work = Path(tmp)
        base_tree = worktree(options.base, work / "base")
        sides = [Side("base", base_tree), Side("new", ROOT)]
        ratios: list[float] = []
        try:
            for round_no in range(options.rounds):
                got = one_round(sides, work, options, first=round_no % 2)
                base, new = got["base"], got["new"]
                ratios.append(new[1] / base[1])
                print(
                    f"round {round_no + 1}: base {base[0].rps:,.0f} req/s {base[1]:,.0f} us/req"
                    f" | new {new[0].rps:,.0f} req/s {new[1]:,.0f} us/req"
                    f" | new/base CPU {ratios[-1]:.3f}",
                    flush=True,
                )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                check=False,
            )
        print(
            f"{options.method}: new/base CPU per request, median of {len(ratios)}: "
            f"{statistics.median(ratios):.3f} (lower is better)"
        )
    return 0


if __name__ == "__main__":
    interrupt_on_sigterm()  # servers are stopped on SIGTERM too
    raise SystemExit(main())
