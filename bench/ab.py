"""A/B a benchmark between two source trees, rounds alternated, and print the ratios.

This machine class differs 1.5-2x from one box to the next and from one minute to the next, so a
figure means something only against another taken in the same session. This runs one benchmark
script (``bench/ingest.py`` by default, or ``bench/smtp_ingest.py``) from each tree in turn,
A B A B ..., with this interpreter (the trees share one virtualenv; each run imports the code of its
own tree, because the gateway child starts with its tree as the working directory), parses the
figures every run prints and shows each round and the median ratio B/A.

The baseline tree is usually a ``git archive`` of the commit before a change, with the current
``bench/`` copied in, so both sides are measured by the same script::

    mkdir -p /tmp/base && git archive 2f1c58a | tar -x -C /tmp/base && cp -r bench /tmp/base/
    .venv/bin/python bench/ab.py --a /tmp/base --b . --rounds 3 -- --seconds 8 --skip-bare
    .venv/bin/python bench/ab.py --a /tmp/base --b . --script bench/smtp_ingest.py -- \
        --e2e --sizes 5 --mails 2000 --skip-bare

The same tree on two settings works too: ``--a . --b . --b-extra="--store postgresql"`` (with the ``=``) gives
PostgreSQL against SQLite of one build.

Usage: bench/ab.py --a DIR --b DIR [--rounds N] [--script bench/ingest.py] [--b-extra=ARGS]
       [-- args for the script]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

# "  gateway          953 us in all", "    event loop        330", "  on the queue  6231 events, 774 events/s"
_FIGURES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("gateway us/event", re.compile(r"^\s*gateway\s+(\d+) us in all")),
    ("event loop us", re.compile(r"^\s*event loop\s+(\d+)\s*$")),
    ("writer+threads us", re.compile(r"^\s*store writer and other threads\s+(\d+)\s*$")),
    ("relay us", re.compile(r"^\s*relay process\s+(\d+)\s*$")),
    ("normalizer us", re.compile(r"^\s*normalizer process\s+(\d+)\s*$")),
    ("postgresql us", re.compile(r"^\s*postgresql\s+(\d+)\s*$")),
    ("events/s", re.compile(r"on the queue\s+\d+ events, ([\d,]+) events/s")),
    ("closed p99 ms", re.compile(r"^\s*ack latency\s+p50 [\d.]+ ms, p99 ([\d.]+) ms\s*$")),
    ("open p99 ms", re.compile(r"^\s*ack latency\s+p50 [\d.]+ ms, p99 ([\d.]+) ms, max")),
    # bench/smtp_ingest.py: "5 KB  end to end  197 mails/s  server CPU 2320 us/mail (event loop 530, ...)"
    ("mail us/mail", re.compile(r"end to end .*server CPU\s+(\d+) us/mail")),
    ("mail event loop us", re.compile(r"end to end .*\(.*event loop (\d+)")),
    ("mail threads us", re.compile(r"end to end .*\(.*other threads (\d+)")),
    ("mail normalizer us", re.compile(r"end to end .*\(.*normalizer process (\d+)")),
    ("mail relay us", re.compile(r"end to end .*\(.*relay process (\d+)")),
    ("mails/s", re.compile(r"end to end\s+(\d+) mails/s")),
)


def figures(output: str) -> dict[str, float]:
    """The figures a run printed, by name; a figure the run did not print is absent."""
    found: dict[str, float] = {}
    for line in output.splitlines():
        for name, pattern in _FIGURES:
            match = pattern.search(line)
            if match is not None and name not in found:
                found[name] = float(match.group(1).replace(",", ""))
    return found


def run_once(tree: Path, script: str, args: list[str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, script, *args], cwd=tree, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{script} failed in {tree} (exit {done.returncode})")
    return figures(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline tree")
    parser.add_argument("--b", type=Path, required=True, help="the tree under test")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--script", default="bench/ingest.py")
    parser.add_argument(
        "--b-extra",
        default="",
        help="arguments for B only, e.g. '--store postgresql' to set one store against the other",
    )
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the script's own arguments")
    args = parser.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    rounds: list[tuple[dict[str, float], dict[str, float]]] = []
    for number in range(1, args.rounds + 1):
        a = run_once(args.a.resolve(), args.script, rest)
        b = run_once(args.b.resolve(), args.script, rest + args.b_extra.split())
        rounds.append((a, b))
        shown = ", ".join(f"{k} {a.get(k, float('nan')):g} -> {b.get(k, float('nan')):g}" for k in a)
        print(f"round {number}: {shown}", flush=True)
    print(f"\n{'figure':<20}{'A (median)':>12}{'B (median)':>12}{'B/A median':>12}  per-round B/A")
    for name, _ in _FIGURES:
        pairs = [(a[name], b[name]) for a, b in rounds if name in a and name in b]
        if not pairs:
            continue
        ratios = [b / a for a, b in pairs if a]
        med_a = statistics.median(a for a, _ in pairs)
        med_b = statistics.median(b for _, b in pairs)
        ratio = statistics.median(ratios) if ratios else float("nan")
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{name:<20}{med_a:>12,.0f}{med_b:>12,.0f}{ratio:>12.2f}  {each}")


if __name__ == "__main__":
    main()
