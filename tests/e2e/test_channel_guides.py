"""Each set-up guide in docs/channels/ followed as a new user would: its "Try it" commands, run as
written against a gateway on the development config, make the events the guide promises.

A guide's runnable block is a ``sh`` block whose first line is the comment
``# against config/ticketgate.dev.toml (make run)``. The gateway runs on free ports, so the test
rewrites the dev config's ports (8080, 2525) and ``.venv/bin/`` to this checkout's; nothing else.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, GatewayProcess, free_port
from tests.support.consumer import Consumer
from tests.support.rabbitmq import Janitor, unique
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

GUIDES = ROOT / "docs" / "channels"
MARKER = "# against config/ticketgate.dev.toml (make run)"
# Distinct message.received events each guide's commands make (repeats and forgeries make none).
EXPECTED = {
    "api": 1, "form": 1, "email": 1, "wechat": 2, "wecom": 1, "telegram": 1, "whatsapp": 1, "messenger": 1,
    "instagram": 1, "line": 1, "x": 1, "webchat": 1, "slack": 1, "miniprogram": 1, "douyin": 1,
    "weibo": 1, "feishu": 1, "dingtalk": 1,
}
# Guides without a dev-config block, and why.
NOT_RUNNABLE = {"wechat_kf": "the gateway would call Tencent's API at start-up", "README": "the index"}


def runnable_blocks(guide: Path) -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", guide.read_text(encoding="utf-8"), flags=re.S)
    return [block for block in blocks if block.startswith(MARKER)]


def test_every_guide_but_the_named_ones_can_be_tried_against_the_dev_config() -> None:
    guides = {path.stem for path in GUIDES.glob("*.md")}
    assert guides == set(EXPECTED) | set(NOT_RUNNABLE)
    for name in EXPECTED:
        assert runnable_blocks(GUIDES / f"{name}.md"), f"{name}.md has no block to try"


class DevGateway:
    def __init__(self, process: GatewayProcess, smtp_port: int, consumer: Consumer) -> None:
        self.process = process
        self.smtp_port = smtp_port
        self.consumer = consumer

    def run(self, block: str) -> subprocess.CompletedProcess[str]:
        """The block as a reader would paste it, on this gateway's ports and this checkout's venv."""
        script = (
            block.replace("127.0.0.1:8080", f"127.0.0.1:{self.process.port}")
            .replace("127.0.0.1:2525", f"127.0.0.1:{self.smtp_port}")
            .replace(".venv/bin/", f"{Path(sys.executable).parent}/")
        )
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
        )


@pytest.fixture
async def dev_gateway(tmp_path: Path, amqp_url: str, amqp_names: Janitor) -> AsyncIterator[DevGateway]:
    port, smtp_port = free_port(), free_port()
    exchange = amqp_names.exchange("guides")
    config = tmp_path / "ticketgate.toml"
    config.write_text((ROOT / "config" / "ticketgate.dev.toml").read_text(encoding="utf-8"))
    process = GatewayProcess(config=config, port=port, log_path=tmp_path / "gateway.log")
    process.env = {
        "TICKETGATE__SERVER__PORT": str(port),
        "TICKETGATE__SERVER__PUBLIC_URL": f'"http://127.0.0.1:{port}"',
        "TICKETGATE__CHANNELS__EMAIL__SMTP__PORT": str(smtp_port),
        "TICKETGATE__STORE__PATH": str(tmp_path / "ticketgate.db"),
        "TICKETGATE__STORE__BLOB_DIR": str(tmp_path / "blobs"),
        "TICKETGATE__BROKER__URL": amqp_url,
        "TICKETGATE__BROKER__EXCHANGE": exchange,
        "TICKETGATE__BROKER__QUEUES": "[]",
        "TICKETGATE__CONTROL__QUEUE": unique("control"),
        "TICKETGATE__LOG__FORMAT": "json",
    }
    consumer = await Consumer(amqp_url, exchange).start()
    await process.start()
    try:
        yield DevGateway(process, smtp_port, consumer)
    finally:
        await process.stop()
        await consumer.close()


def metric(url: str, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, flags=re.M)
    return float(found.group(1)) if found else 0.0


async def test_the_try_it_commands_of_every_guide_make_their_events(dev_gateway: DevGateway) -> None:
    require_tool("curl", "curl")
    require_tool("swaks", "swaks")
    require_tool("openssl", "openssl")
    gateway = dev_gateway.process
    for name in EXPECTED:
        for block in runnable_blocks(GUIDES / f"{name}.md"):
            done = dev_gateway.run(block)
            output = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            assert done.returncode == 0, f"{name}.md:\n{block}\n{output}"

    def received_by_channel() -> Counter[str]:
        received = [
            json.loads(delivery.body)
            for delivery in dev_gateway.consumer.distinct()
            if delivery.routing_key.endswith(".message.received")
        ]
        return Counter(event["message"]["channel"] for event in received)

    # Other events (a guide's edit, a merge) count among the distinct deliveries: wait for the
    # received ones themselves.
    with contextlib.suppress(AssertionError):
        await dev_gateway.consumer.wait_until(lambda: received_by_channel() == EXPECTED, within=30)
    assert received_by_channel() == EXPECTED

    # The forged WeChat callback of wechat.md was refused and counted.
    refused = metric(gateway.url, "ticketgate_refusals_total",
                     'channel="wechat",inbox="demo",reason="signature"')
    assert refused == 1
    for channel in ("miniprogram", "douyin", "weibo"):
        labels = f'channel="{channel}",inbox="demo",reason="signature"'
        assert metric(gateway.url, "ticketgate_refusals_total", labels) == 1, channel

    # Every URL the guides send to is one the start-up summary printed.
    log = gateway.log()
    for path in ("/api/v1/messages", "/forms/demo", "/forms/demo/embed.js", "/wechat/demo", "/wecom/demo",
                 "/telegram/demo", "/meta/demo", "/chat/demo/widget.js", "/slack/demo/events",
                 "/miniprogram/demo", "/douyin/demo", "/weibo/demo"):
        assert f"http://127.0.0.1:{gateway.port}{path}" in log, path
    assert f"smtp://127.0.0.1:{dev_gateway.smtp_port} for support@demo.localhost" in log
