"""Mini Program conformance against the wechatpy corpus (/work/shared/corpora/wechatpy).

A Mini Program's push is the Official Account's protocol in XML or JSON. This runner takes every
Official Account packet of the corpus (the packets of WeChat's own documentation, as wechatpy
reproduces them), sends each through the Mini Program's path twice, as the XML document and as the
JSON document a Mini Program in JSON format receives (CreateTime and MsgId as numbers), and checks
that both become the same message (idempotency key, kind, text, identities). It then runs the
corpus's Official Account crypto vectors with the ``Encrypt`` value in a JSON body, through the
JSON extraction, the signature check and the decryption the connector uses.

    .venv/bin/python -m bench.conformance_miniprogram [corpus dir]

Prints agreement figures; exits 1 when any packet disagrees or a vector fails.
"""

from __future__ import annotations

import ast
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from connectors.wechat.security import BadSignature, CallbackSecurity, extract_json_encrypt
from core.errors import InvalidInput, NormalizationError
from core.model import RawEnvelope
from normalizers.wechat import parse_callback_xml
from normalizers.wechat_miniprogram import normalize

CORPUS = Path("/work/shared/corpora/wechatpy")
NUMERIC = ("CreateTime", "MsgId", "MsgID")


def as_json(fields: dict[str, Any]) -> bytes:
    """The JSON document with the same fields (numbers where WeChat's JSON has numbers)."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in NUMERIC and isinstance(value, str) and value.strip().isdigit():
            out[key] = int(value.strip())
        else:
            out[key] = value
    return orjson.dumps(out)


def envelope(plaintext: str) -> RawEnvelope:
    return RawEnvelope(channel="miniprogram", tenant="t", inbox="i", body=b"", signature_verified=True,
                       received_at=datetime(2025, 12, 5, tzinfo=UTC),
                       meta={"plaintext": plaintext, "app_id": "wx0123456789abcdef", "account": "a"})


def summary(plaintext: str) -> tuple[Any, ...]:
    [m] = normalize(envelope(plaintext))
    return (m.idempotency_key(), m.kind, m.text, tuple((i.kind, i.value) for i in m.identities),
            m.extra.get("event"), tuple((r.kind, r.ref) for r in m.media))


def packets(root: Path) -> tuple[int, int, list[str]]:
    agreed, total, problems = 0, 0, []
    for path in sorted((root / "xml_official_account").glob("*.xml")):
        total += 1
        xml = path.read_text(encoding="utf-8")
        try:
            fields = parse_callback_xml(xml)
            if summary(xml) == summary(as_json(fields).decode()):
                agreed += 1
            else:
                problems.append(f"{path.name}: JSON and XML differ")
        except (InvalidInput, NormalizationError) as exc:
            problems.append(f"{path.name}: {type(exc).__name__}: {exc}")
    return agreed, total, problems


def vectors(root: Path) -> tuple[int, int, list[str]]:
    data = orjson.loads((root / "crypto_vectors.json").read_bytes())
    items = [v for v in data.get("vectors", []) if str(v.get("kind", "")).startswith("mp_")]
    passed, problems = 0, []
    for vector in items:
        security = CallbackSecurity(flavor="official_account", receive_id=vector["receive_id"],
                                    tokens=(vector["token"],), aes_keys=(vector["encoding_aes_key"],),
                                    clock=lambda v=vector: float(v.get("timestamp") or v["sample_timestamp"]))
        try:
            if vector["kind"] == "mp_encrypt_fixed_random":
                body = orjson.dumps({"ToUserName": "gh", "Encrypt": vector["expected_encrypt"]})
                encrypt = extract_json_encrypt(body)
                ok = security.decrypt(encrypt) == vector["plaintext"]
                sig = vector.get("expected_msg_signature_for_sample_ts_nonce")
                if sig:
                    security.verify_msg(sig, vector["sample_timestamp"], vector["sample_nonce"], encrypt)
            elif vector["kind"] == "mp_decrypt_message":
                encrypt_xml = parse_callback_xml(vector["post_body"])["Encrypt"]
                encrypt = extract_json_encrypt(orjson.dumps({"ToUserName": "gh", "Encrypt": encrypt_xml}))
                try:
                    signed = (vector["msg_signature"], vector["timestamp"], vector["nonce"])
                    security.verify_msg(*signed, encrypt)
                    ok = vector.get("expect") != "invalid_signature"
                    expected = vector.get("expected_fields")
                    if ok and expected:
                        fields = parse_callback_xml(security.decrypt(encrypt))
                        ok = all(fields.get(k) == v for k, v in ast.literal_eval(expected).items())
                except BadSignature:
                    ok = vector.get("expect") == "invalid_signature"
            else:
                continue
        except (InvalidInput, BadSignature, KeyError) as exc:
            ok = False
            problems.append(f"{vector['id']}: {type(exc).__name__}: {exc}")
        if ok:
            passed += 1
        elif not problems or not problems[-1].startswith(vector["id"]):
            problems.append(f"{vector['id']}: disagrees")
    return passed, len(items), problems


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else CORPUS
    if not root.is_dir():
        print(f"corpus not found at {root}")
        return 0
    agreed, total, problems = packets(root)
    print(f"packets: {agreed}/{total} give the same message as XML and as JSON")
    passed, count, vector_problems = vectors(root)
    print(f"Official Account crypto vectors through the JSON body path: {passed}/{count}")
    for problem in problems + vector_problems:
        print(f"  {problem}")
    return 0 if agreed == total and passed == count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
