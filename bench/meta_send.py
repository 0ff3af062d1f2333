"""Send a signed Meta test webhook (WhatsApp, Messenger or Instagram) to a running gateway.

    .venv/bin/python -m bench.meta_send "My parcel has not arrived."
    .venv/bin/python -m bench.meta_send --channel messenger "Can I change the address?"
    .venv/bin/python -m bench.meta_send --channel instagram --from 1254459154682919 "Still in M?"
    .venv/bin/python -m bench.meta_send --handshake

Defaults match the demo app of config/ticketgate.dev.toml (/meta/demo, app secret
dev-meta-app-secret, verify token dev-meta-verify) at http://127.0.0.1:8080. The body is what Meta
sends for a text message and is signed as Meta signs it (``X-Hub-Signature-256``); ``--wrong-secret``
signs it with another secret to see the refusal (401). Prints the status and the answer.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import secrets
import sys
import time
from typing import Any
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

DEV_URL = "http://127.0.0.1:8080/meta/demo"
DEV_SECRET = "dev-meta-app-secret"
DEV_VERIFY = "dev-meta-verify"


def body(channel: str, text: str, sender: str, recipient: str) -> dict[str, Any]:
    now = int(time.time())
    mid = secrets.token_hex(12)
    if channel == "whatsapp":
        value = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": recipient},
            "contacts": [{"profile": {"name": "Test Customer"}, "wa_id": sender}],
            "messages": [
                {
                    "from": sender,
                    "id": f"wamid.CLI{mid}",
                    "timestamp": str(now),
                    "type": "text",
                    "text": {"body": text},
                }
            ],
        }
        return {
            "object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}],
        }
    item = {
        "sender": {"id": sender},
        "recipient": {"id": recipient},
        "timestamp": now * 1000,
        "message": {"mid": f"m_CLI{mid}", "text": text},
    }
    return {
        "object": "page" if channel == "messenger" else "instagram",
        "entry": [{"id": recipient, "time": now * 1000, "messaging": [item]}],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("text", nargs="?", default="Where is my order?")
    parser.add_argument("--channel", choices=("whatsapp", "messenger", "instagram"), default="whatsapp")
    parser.add_argument("--url", default=DEV_URL)
    parser.add_argument("--secret", default=DEV_SECRET)
    parser.add_argument("--from", dest="sender", help="wa_id, PSID or IGSID of the customer")
    parser.add_argument("--to", dest="recipient", help="phone_number_id, Page id or Instagram account id")
    parser.add_argument("--wrong-secret", action="store_true", help="sign with another secret (expect 401)")
    parser.add_argument("--handshake", action="store_true", help="the GET subscription handshake instead")
    parser.add_argument("--verify-token", default=DEV_VERIFY)
    args = parser.parse_args()
    if args.handshake:
        query = urlencode(
            {"hub.mode": "subscribe", "hub.verify_token": args.verify_token, "hub.challenge": "4242"}
        )
        request = Request(f"{args.url}?{query}")
    else:
        defaults = {
            "whatsapp": ("4915112345678", "106540352242922"),
            "messenger": ("6254147181305912", "104553821234567"),
            "instagram": ("1254459154682919", "17841405822304914"),
        }[args.channel]
        raw = json.dumps(
            body(args.channel, args.text, args.sender or defaults[0], args.recipient or defaults[1]),
            ensure_ascii=False,
        ).encode()
        secret = ("not-" + args.secret) if args.wrong_secret else args.secret
        signature = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        request = Request(
            args.url,
            data=raw,
            method="POST",
            headers={"Content-Type": "application/json", "X-Hub-Signature-256": signature},
        )
    try:
        with urlopen(request, timeout=30) as answer:
            print(answer.status, answer.read().decode(errors="replace"))
            return 0
    except HTTPError as exc:
        print(exc.code, exc.read().decode(errors="replace"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
