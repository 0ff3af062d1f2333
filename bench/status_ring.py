"""What the status page's per-minute rings add to the hot path: ``Metrics.message_done`` per call,
with the rings (as shipped) and with them replaced by a no-op, on this machine.

    .venv/bin/python bench/status_ring.py
"""

from __future__ import annotations

import time

from gateway.metrics import Metrics


class _NoRing:
    def outcome(self, *args: object) -> None:
        pass


def per_call(metrics: Metrics, n: int = 300_000) -> float:
    done = metrics.message_done
    started = time.perf_counter()
    for i in range(n):
        done("api", "accepted", 0.004, inbox="shop" if i & 1 else "app")
    return (time.perf_counter() - started) / n * 1e9


def main() -> None:
    with_rings = Metrics()
    without = Metrics()
    without.recent = _NoRing()  # type: ignore[assignment]
    for metrics in (with_rings, without):
        per_call(metrics, 20_000)  # warm the labelled children
    rounds = [(per_call(with_rings), per_call(without)) for _ in range(5)]
    ring = min(r[0] for r in rounds)
    plain = min(r[1] for r in rounds)
    print(f"message_done with rings:    {ring:7.0f} ns/call (best of 5)")
    print(f"message_done without rings: {plain:7.0f} ns/call (best of 5)")
    print(f"the rings add:              {ring - plain:7.0f} ns/call")


if __name__ == "__main__":
    main()
