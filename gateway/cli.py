"""The ``ticketgate`` command: run the daemon, check a config, watch the bus, inspect the store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

import orjson

from core.errors import ConfigError
from core.settings import Settings, load_settings
from gateway.process import new_event_loop

DEFAULT_CONFIG = "config/ticketgate.dev.toml"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# The youngest generation is collected after this many net allocations (CPython's default: 700).
# A request allocates a few hundred objects, nearly all gone by its answer: at the default the
# collector ran several times per request. Measured (bench/ab.py, 2 sessions of 3 alternated rounds
# at 1,000 req/s): event loop CPU 0.90-0.93x, open-loop p99 58 -> 46 and 63 -> 48 ms.
_YOUNG_COLLECTION_AFTER = 7000


async def _freeze_startup_heap(app: object) -> None:
    """Move what start-up allocated out of the collector's reach (``gc.freeze``), and collect the
    youngest generation less often.

    The modules, settings, compiled patterns and connections live as long as the process, yet every
    full collection walked them all again: ~20-26 ms with the GIL held, about once a second under
    load. Frozen, a full collection walks only what came later (0.6-5 ms measured).
    """
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_YOUNG_COLLECTION_AFTER, older, oldest)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import create_app
    from gateway.keys import CHANNELS
    from gateway.logs import configure_logging
    from gateway.serve import run_until_stopped, serve
    from gateway.startup import StartupError, check_listeners, listen_error, log_summary, probe_broker

    settings = _settings(args)
    configure_logging(settings.log)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        # Before anything starts: a port in use (exit 3) or a broker that refuses us (exit 4) is one line.
        check_listeners(settings)
        broker_problem = loop.run_until_complete(probe_broker(settings))
        app = create_app(settings)
        app.on_startup.append(_freeze_startup_heap)
        # SIGTERM/SIGINT: the listener closes, in-flight requests get shutdown_timeout to finish, then
        # cleanup_ctx runs in reverse (connectors, relay drain, store), all of it bounded (gateway.serve).
        # Once every listener is bound, the start-up summary.
        return run_until_stopped(
            loop,
            serve(app, settings, on_listening=lambda: log_summary(settings, app[CHANNELS], broker_problem)),
        )
    except StartupError as exc:
        print(f"ticketgate: {exc}", file=sys.stderr)
        if not loop.is_closed():
            loop.close()
        return exc.code
    except OSError as exc:
        error = listen_error(settings, exc)
        if error is None:
            raise
        print(f"ticketgate: {error}", file=sys.stderr)
        return error.code


def cmd_check_config(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from gateway.channels import Registry
    from gateway.desk import DeskApi
    from gateway.logs import configure_logging

    settings = _settings(args)
    configure_logging(settings.log)
    # Channel tables are validated when their connectors are built.
    names = [descriptor.name for descriptor, _ in Registry.installed().configured(settings)]
    if DeskApi.from_settings(settings) is not None:
        names.append("identity")
    names_text = ", ".join(names) or "none"
    print(f"{args.config}: OK (inboxes: {len(settings.inboxes)}, channels: {names_text})", file=out)
    return 0


def health_url(settings: Settings, *, ready: bool = False) -> str:
    """Where this configuration's gateway answers /healthz (or /readyz), from the same host."""
    from gateway.startup import listen_url

    return f"{listen_url(settings)}/{'readyz' if ready else 'healthz'}"


def cmd_health(args: argparse.Namespace) -> int:
    """Ask the running gateway whether it is alive (or ready); 0 when it answers 200, else 1.

    The container HEALTHCHECK: it reads the same config and environment as ``run``, so it probes the
    port the gateway really listens on.
    """
    import urllib.error
    import urllib.request

    url = health_url(_settings(args), ready=args.ready)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310 - http:// built above
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"{url}: {getattr(exc, 'reason', exc)}")
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


def cmd_tail(args: argparse.Namespace) -> int:
    from gateway.tail import ExchangeMissing, tail

    if args.pattern and args.binding and args.pattern != args.binding:
        print("ticketgate tail: give the pattern once (positional or --binding)", file=sys.stderr)
        return 2
    binding = args.pattern or args.binding or "#"
    settings = _settings(args)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(tail(settings.broker, binding, json_lines=args.json, out=sys.stdout))
    except ExchangeMissing as exc:
        print(f"ticketgate tail: {exc}", file=sys.stderr)
        return 1
    return 0


async def _outbox_status(settings: Settings, out: TextIO) -> int:
    from gateway.store import build_store

    store = build_store(settings)
    await store.open()
    try:
        status = await store.outbox_status()
    finally:
        await store.close()
    oldest = status.oldest_created_at
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest else None
    print(f"backlog:          {status.backlog} (bound {settings.outbox.max_backlog})", file=out)
    print(f"oldest unpublished: {f'{age:.1f} s ago' if age is not None else '-'}", file=out)
    print(f"published total:  {status.published_total}", file=out)
    return 0


async def _quarantine(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    from core.events import isoformat
    from gateway import quarantine
    from gateway.channels import Registry
    from gateway.enrich import Enricher
    from gateway.metrics import Metrics
    from gateway.pipeline import Pipeline
    from gateway.store import build_store

    store = build_store(settings)
    await store.open()
    try:
        if args.action == "list":
            records = await quarantine.list_records(store, limit=args.limit)
            for r in records:
                print(
                    f"{r.id}  {isoformat(r.received_at)}  {r.channel}/{r.inbox}  {r.size} B  "
                    f"{quarantine.state_text(r)}",
                    file=out,
                )
                print(f"    {r.reason}", file=out)
            if not records:
                print("quarantine is empty", file=out)
            return 0
        if args.action == "show":
            found = await quarantine.show(store, args.id)
            if found is None:
                print(f"no quarantined message {args.id!r}", file=sys.stderr)
                return 1
            record, envelope = found
            info = quarantine.record_info(record, envelope)
            print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode(), file=out)
            if args.raw:
                sys.stdout.flush()
                os.write(sys.stdout.fileno(), envelope.body)
            return 0
        # replay: the events land in the outbox; the running gateway's relay publishes them.
        registry = Registry.installed()
        pipeline = Pipeline(settings, store, Metrics(), enrich=Enricher.from_settings(settings).enrich)
        result = await quarantine.replay(
            store, pipeline, lambda channel: registry.normalizer(channel, settings), args.id
        )
        if result is None:
            print(f"no quarantined message {args.id!r}", file=sys.stderr)
            return 1
        print(f"{result.id}: {result.summary}", file=out)
        return 0 if result.stored else 1
    finally:
        await store.close()


def _confirm_erase(args: argparse.Namespace) -> int | None:
    """``None`` to go on; else the exit code (an erasure cannot be undone: ask, or want --yes)."""
    if args.yes:
        return None
    if not sys.stdin.isatty():
        print("ticketgate: erasing cannot be undone; add --yes to confirm", file=sys.stderr)
        return 2
    answer = input(f"Erase customer {args.id} and everything they said, for good? [y/N] ")
    if answer.strip().lower() in ("y", "yes"):
        return None
    print("ticketgate: nothing erased", file=sys.stderr)
    return 1


async def _customer_erase(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """Erase a customer; the running gateway's relay publishes ``customer.erased``."""
    import getpass

    from gateway.desk.api import erasure_json
    from gateway.store import build_store

    store = build_store(settings)
    await store.open()
    try:
        by = args.by or f"cli:{getpass.getuser()}"
        erasure = await store.erase_customer(args.id, requested_by=by, tenant=args.tenant)
    finally:
        await store.close()
    if erasure is None:
        print(f"ticketgate: no customer {args.id!r}" + (f" in tenant {args.tenant!r}" if args.tenant else ""),
              file=sys.stderr)  # fmt: skip
        return 1
    print(orjson.dumps(erasure_json(erasure), option=orjson.OPT_INDENT_2).decode(), file=out)
    return 0


def _store_vacuum(settings: Settings, out: TextIO) -> int:
    """One full VACUUM of the SQLite file so freed pages can go back to the file system later."""
    from gateway.store.sqlite import vacuum_file

    if settings.store.backend != "sqlite":
        print("ticketgate: PostgreSQL reclaims space with autovacuum; nothing to do here", file=out)
        return 0
    path = settings.store.path
    if not path.exists():
        print(f"ticketgate: no database at {path}", file=sys.stderr)
        return 1
    before, after = vacuum_file(path)
    print(f"{path}: auto_vacuum = INCREMENTAL; {before} -> {after} bytes", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ticketgate", description=__doc__)
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("TICKETGATE_CONFIG", DEFAULT_CONFIG),
        help=f"TOML settings file (default: $TICKETGATE_CONFIG or {DEFAULT_CONFIG})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the gateway daemon")
    sub.add_parser("check-config", help="validate the settings and every configured channel")
    health = sub.add_parser("health", help="exit 0 when the running gateway answers /healthz (HEALTHCHECK)")
    health.add_argument("--ready", action="store_true", help="ask /readyz instead: store and broker usable")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    tail = sub.add_parser("tail", help="print events from the bus as they arrive")
    # `ticketgate tail 'acme.#'` (as docs/events.md shows it) and `--binding 'acme.#'` both work.
    tail.add_argument("pattern", nargs="?", help="routing-key pattern, e.g. 'acme.#' or '*.email.#'")
    tail.add_argument("--binding", help="the same pattern, as an option (default '#')")
    tail.add_argument("--json", action="store_true", help="one raw JSON event per line")
    outbox = sub.add_parser("outbox", help="inspect the outbox")
    outbox.add_argument("action", choices=["status"])
    quarantine = sub.add_parser("quarantine", help="inspect and replay quarantined messages")
    qsub = quarantine.add_subparsers(dest="action", required=True)
    qlist = qsub.add_parser("list")
    qlist.add_argument("--limit", type=int, default=100)
    qshow = qsub.add_parser("show")
    qshow.add_argument("id")
    qshow.add_argument("--raw", action="store_true", help="also write the raw bytes to stdout")
    qreplay = qsub.add_parser("replay")
    qreplay.add_argument("id")
    customer = sub.add_parser("customer", help="act on a customer (erase their personal data)")
    csub = customer.add_subparsers(dest="action", required=True)
    cerase = csub.add_parser(
        "erase", help="erase a customer's messages, raw bodies, files and identities; publish customer.erased"
    )
    cerase.add_argument("id", help="the customer id (cus_...), as in the events")
    cerase.add_argument("--tenant", help="refuse unless the customer belongs to this tenant")
    cerase.add_argument("--by", help="who asked, for the audit record (default: cli:<user>)")
    cerase.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    store = sub.add_parser("store", help="store maintenance")
    ssub = store.add_subparsers(dest="action", required=True)
    ssub.add_parser(
        "vacuum", help="SQLite: rebuild the file once so retention can give space back (gateway stopped)"
    )
    # --config is accepted after the subcommand too: `ticketgate run --config PATH`.
    for p in (*sub.choices.values(), qlist, qshow, qreplay, cerase, *ssub.choices.values()):
        p.add_argument("--config", "-c", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check-config":
            return cmd_check_config(args)
        if args.command == "tail":
            return cmd_tail(args)
        if args.command == "health":
            return cmd_health(args)
        settings = _settings(args)
        if args.command == "outbox":
            return asyncio.run(_outbox_status(settings, sys.stdout))
        if args.command == "customer":
            refused = _confirm_erase(args)
            if refused is not None:
                return refused
            return asyncio.run(_customer_erase(settings, args, sys.stdout))
        if args.command == "store":
            return _store_vacuum(settings, sys.stdout)
        return asyncio.run(_quarantine(settings, args, sys.stdout))
    except ConfigError as exc:
        print(f"ticketgate: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
