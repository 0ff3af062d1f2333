"""The operator's commands against a real store: outbox status, quarantine list / show / replay."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from core.model import RawEnvelope
from core.settings import load_settings
from gateway.cli import main
from gateway.store.sqlite import SQLiteStore


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "ticketgate.toml"
    path.write_text(
        f"""
[store]
path = "{tmp_path / "ticketgate.db"}"
blob_dir = "{tmp_path / "blobs"}"

[tenants.demo]

[inboxes.demo]
tenant = "demo"
"""
    )
    return path


async def quarantine_one(config: Path, body: bytes) -> str:
    """What the pipeline does with a verified message its normalizer could not handle."""
    settings = load_settings(config)
    store = SQLiteStore(settings.store, settings.outbox)
    await store.open()
    try:
        envelope = RawEnvelope(
            channel="api",
            tenant="demo",
            inbox="demo",
            body=body,
            received_at=datetime.now(UTC),
            content_type="application/json",
            signature_verified=True,
        )
        record = await store.quarantine(envelope, "normalizer error: KeyError: 'customer'")
        return record.id
    finally:
        await store.close()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().out


async def test_quarantine_list_show_and_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    body = orjson.dumps({"customer": {"email": "ada@example.com"}, "text": "It broke.", "external_id": "m-1"})
    qid = await quarantine_one(config, body)

    code, out = await asyncio.to_thread(run, ["quarantine", "list", "--config", str(config)], capsys)
    assert code == 0
    assert qid in out
    assert "KeyError" in out
    assert "held" in out

    code, out = await asyncio.to_thread(run, ["quarantine", "show", qid, "--config", str(config)], capsys)
    assert code == 0
    shown = orjson.loads(out)
    assert shown["reason"] == "normalizer error: KeyError: 'customer'"
    assert shown["size"] == len(body)

    code, out = await asyncio.to_thread(run, ["outbox", "status", "--config", str(config)], capsys)
    assert code == 0
    assert "backlog:          1" in out  # the message.quarantined event

    code, out = await asyncio.to_thread(run, ["quarantine", "replay", qid, "--config", str(config)], capsys)
    assert code == 0, out
    assert "accepted" in out

    code, out = await asyncio.to_thread(run, ["quarantine", "list", "--config", str(config)], capsys)
    assert "replayed" in out
    code, out = await asyncio.to_thread(run, ["outbox", "status", "--config", str(config)], capsys)
    assert "backlog:          2" in out  # ... and now the replayed message.received


async def test_a_replay_that_fails_again_is_reported_not_hidden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    qid = await quarantine_one(config, b"{not json")
    code, out = await asyncio.to_thread(run, ["quarantine", "replay", qid, "--config", str(config)], capsys)
    assert code == 1
    assert "rejected" in out
    code, out = await asyncio.to_thread(run, ["quarantine", "list", "--config", str(config)], capsys)
    assert "held" in out  # still held for the next fix


def test_unknown_quarantine_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert main(["quarantine", "show", "qua_nope", "--config", str(config)]) == 1
    assert "no quarantined message" in capsys.readouterr().err


@pytest.mark.parametrize(("host", "url"), [
    ("0.0.0.0", "http://127.0.0.1:8123/healthz"),
    ("::", "http://[::1]:8123/healthz"),
    ("10.1.2.3", "http://10.1.2.3:8123/healthz"),
    ("fd00::5", "http://[fd00::5]:8123/healthz"),
])
def test_health_probes_where_the_gateway_listens(host: str, url: str) -> None:
    from core.settings import Settings
    from gateway.cli import health_url

    settings = Settings.model_validate({"server": {"host": host, "port": 8123}})
    assert health_url(settings) == url
    assert health_url(settings, ready=True) == url.replace("healthz", "readyz")


async def test_health_exit_codes_follow_the_gateway_s_answers(
    tmp_path: Path, unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """The container HEALTHCHECK: 0 for a 200, 1 for anything else and for nobody listening."""
    from aiohttp import web

    config = write_config(tmp_path)
    config.write_text(config.read_text() + f"\n[server]\nhost = \"127.0.0.1\"\nport = {unused_tcp_port}\n")
    argv = ["health", "--config", str(config), "--timeout", "2"]

    code, out = await asyncio.to_thread(run, argv, capsys)
    assert code == 1
    assert "refused" in out.lower()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "unavailable"}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        code, out = await asyncio.to_thread(run, argv, capsys)
        assert (code, out.strip()) == (0, f"http://127.0.0.1:{unused_tcp_port}/healthz: 200")
        code, out = await asyncio.to_thread(run, [*argv, "--ready"], capsys)
        assert (code, out.strip()) == (1, f"http://127.0.0.1:{unused_tcp_port}/readyz: 503")
    finally:
        await runner.cleanup()


async def test_customer_erase_and_store_vacuum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.gateway.store.storekit import POLICY, build_event, envelope, message

    config = write_config(tmp_path)
    settings = load_settings(config)
    store = SQLiteStore(settings.store, settings.outbox)
    await store.open()
    try:
        (placed,) = await store.accept(
            envelope(tenant="demo", inbox="demo"), [message("m-1", tenant="demo", inbox="demo")],
            policies=[POLICY], build_event=build_event,
        )  # fmt: skip
    finally:
        await store.close()
    argv = ["customer", "erase", placed.customer_id, "--by", "dpo", "--config", str(config)]
    code, _ = await asyncio.to_thread(run, argv, capsys)
    assert code == 2  # irreversible: without a terminal to ask, --yes is needed
    argv.append("--yes")

    code, out = await asyncio.to_thread(run, argv, capsys)

    assert code == 0
    erased = orjson.loads(out)
    assert (erased["customer_id"], erased["requested_by"], erased["counts"]["messages"]) == (
        placed.customer_id, "dpo", 1,
    )  # fmt: skip
    other = [*argv[:3], "--tenant", "other", "--yes", "--config", str(config)]
    code, _ = await asyncio.to_thread(run, other, capsys)
    assert code == 1
    code, out = await asyncio.to_thread(run, ["store", "vacuum", "--config", str(config)], capsys)
    assert code == 0
    assert "auto_vacuum = INCREMENTAL" in out
