"""What a wake-up costs at a steady rate against a burst, with no Python in the way.

Two processes pass one byte back and forth over a pair of pipes, as fast as they can (the
baseline) and then at a few steady rates. Each round trip wakes each process once; the
figure is the CPU of both processes per round trip, and the ratio against the burst is
what a steady trickle pays per wake-up on this machine (a processor woken from idle, its
caches cold), which bench.mqtt_ingest's ``--steady`` figures include many times per report.

    .venv/bin/python -m bench.wakeup --rates 250,1000
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import machine


def round_trips(rate: float, count: int) -> float:
    """CPU µs (both processes) per round trip, ``rate`` a second (0: as fast as they go)."""
    to_child, from_parent = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo: reads a byte, sends one back, reports its own CPU at the end
        began = time.process_time()
        for _ in range(count):
            os.read(to_child, 1)
            os.write(to_parent, b"x")
        os.write(to_parent, f"{time.process_time() - began:.9f}".encode().ljust(32))
        os._exit(0)
    began = time.process_time()
    start = time.monotonic()
    for n in range(count):
        if rate:
            wait = start + n / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        os.write(from_parent, b"x")
        os.read(from_child, 1)
    mine = time.process_time() - began
    child = float(os.read(from_child, 32).decode())
    os.waitpid(pid, 0)
    for fd in (to_child, from_parent, from_child, to_parent):
        os.close(fd)
    return (mine + child) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="250,1000", help="steady round trips a second")
    parser.add_argument("--seconds", type=float, default=8.0, help="per steady rate")
    args = parser.parse_args()
    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    burst = round_trips(0, 20_000)
    print(f"burst (baseline)   : {burst:6.1f} us CPU per round trip")
    for rate in [float(r) for r in args.rates.split(",") if r]:
        steady = round_trips(rate, int(rate * args.seconds))
        ratio = steady / burst
        print(f"steady {rate:6.0f}/s   : {steady:6.1f} us CPU per round trip, {ratio:.1f}x")


if __name__ == "__main__":
    main()
