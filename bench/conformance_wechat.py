"""Conformance of the WeChat / WeCom code against the wechatpy corpus (figures, not pass/fail).

Runs every XML sample in ``<corpora>/wechatpy/xml_*`` through ``normalizers.wechat.normalize`` and
compares the result, field by field, with wechatpy's own test assertions
(``expected_xml_official_account.json``, ``expected_xml_work.json``); runs every crypto vector in
``crypto_vectors.json`` through ``connectors.wechat.security``. Prints agreement counts per field
and lists every disagreement.

wechatpy's attribute names are its own (``msg.type``, ``event.key``, ``msg.scene_id`` ...). Each is
read from our output: a typed field of ``extra`` where the normalizer interprets it (type, event,
key, scene, location, url, kf accounts, sender ...), otherwise the element kept verbatim in
``extra["fields"]`` (found by a documented path or by a case- and underscore-insensitive tag
match). wechatpy's synthetic ``subscribe_scan`` event is our ``subscribe`` with a ``scene_id``.
An empty XML element (our ``""``) is counted equal to wechatpy's ``None``.

Usage: ``python bench/conformance_wechat.py [CORPORA_DIR]`` (default ``shared/corpora`` beside the checkout).
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.wechat.security import (  # noqa: E402
    BadSignature,
    CallbackSecurity,
    extract_encrypt,
    signature,
)
from core.model import CanonicalMessage, RawEnvelope  # noqa: E402
from normalizers.wechat import normalize  # noqa: E402

MISSING = object()

# wechatpy attribute -> path inside extra["fields"], where the tag name differs from the attribute.
FIELD_PATHS: dict[str, tuple[Any, ...]] = {
    "id": ("MsgID",),
    "count": ("SendPicsInfo", "Count"),
    "pictures[0]['PicMd5Sum']": ("SendPicsInfo", "PicList", "item", 0, "PicMd5Sum"),
    "scale": ("SendLocationInfo", "Scale"),
    "label": ("SendLocationInfo", "Label"),
    "scan_type": ("ScanCodeInfo", "ScanType"),
    "scan_result": ("ScanCodeInfo", "ScanResult"),
    "shop_id": ("PlaceId",),
    "bssid": ("DeviceNo",),
    "calendar_id": ("CalId",),
    "job_id": ("BatchJob", "JobId"),
    "job_type": ("BatchJob", "JobType"),
    "success_order_id": ("SuccOrderId",),
    "auth_source": ("Source",),
}
# Typed fields of extra (or the message itself) that carry wechatpy's attribute.
TYPED: dict[str, str] = {
    "type": "msg_type", "key": "event_key", "scene_id": "scene_id", "ticket": "ticket",
    "latitude": "latitude", "longitude": "longitude", "precision": "precision", "url": "url",
    "source": "from_user", "target": "to_user", "agent": "agent_id", "account": "kf_account",
    "from_account": "from_kf_account", "to_account": "to_kf_account",
}


def _envelope(channel: str, plaintext: bytes) -> RawEnvelope:
    meta: dict[str, Any] = {"plaintext": plaintext, "account": "conformance", "mode": "safe"}
    meta.update({"corp_id": "wwCONFORMANCE"} if channel == "wecom" else {"app_id": "wxCONFORMANCE"})
    return RawEnvelope(
        channel=channel, tenant="bench", inbox="bench", body=plaintext,
        received_at=datetime.now(UTC), signature_verified=True, meta=meta,
    )


def _walk(fields: Any, path: tuple[Any, ...]) -> Any:
    node = fields
    for step in path:
        if isinstance(step, int):
            node = node if isinstance(node, list) else [node]
            if step >= len(node):
                return MISSING
            node = node[step]
        elif isinstance(node, Mapping) and step in node:
            node = node[step]
        else:
            return MISSING
    return node


def _search(fields: Any, attr: str) -> Any:
    """A tag matching the attribute, ignoring case and underscores, anywhere in the fields."""
    wanted = attr.replace("_", "").lower()
    if isinstance(fields, Mapping):
        for tag, value in fields.items():
            if tag.replace("_", "").lower() == wanted:
                return value
        for value in fields.values():
            found = _search(value, attr)
            if found is not MISSING:
                return found
    elif isinstance(fields, list):
        for value in fields:
            found = _search(value, attr)
            if found is not MISSING:
                return found
    return MISSING


def _list_len(fields: Mapping[str, Any]) -> Any:
    for container, item in (
        ("SubscribeMsgPopupEvent", "List"), ("SubscribeMsgChangeEvent", "List"),
        ("SubscribeMsgSentEvent", "List"), ("AroundBeacons", "AroundBeacon"),
    ):
        value = _walk(fields, (container, item))
        if value is not MISSING:
            return len(value) if isinstance(value, list) else 1
    return MISSING


def ours(message: CanonicalMessage, target: str) -> tuple[Any, str]:
    """Our value for a wechatpy assertion target, and where it came from."""
    extra = message.extra
    fields = extra.get("fields", {})
    attr = target.split(".", 1)[1] if "." in target else target
    if target == "len()":
        return _list_len(fields), "fields"
    if attr == "event":
        event = extra.get("event")
        if event == "subscribe" and extra.get("scene_id") is not None:
            return "subscribe_scan", "typed"
        return event, "typed"
    if attr == "content":
        return message.text, "typed"
    if attr in TYPED and TYPED[attr] in extra:
        return extra[TYPED[attr]], "typed"
    if attr == "location":
        lat = _walk(fields, ("SendLocationInfo", "Location_X"))
        lon = _walk(fields, ("SendLocationInfo", "Location_Y"))
        return [lat, lon], "fields"
    match = re.fullmatch(r"subscribes\[0\]\['(\w+)'\]", attr)
    if match:
        for container in ("SubscribeMsgPopupEvent", "SubscribeMsgChangeEvent", "SubscribeMsgSentEvent"):
            value = _walk(fields, (container, "List", 0, match.group(1)))
            if value is not MISSING:
                return value, "fields"
        return MISSING, "fields"
    if attr in FIELD_PATHS:
        return _walk(fields, FIELD_PATHS[attr]), "fields"
    return _search(fields, attr), "fields"


def agrees(expected: Any, got: Any) -> bool:
    if got is MISSING:
        return expected is None
    if expected is None:
        return got in (None, "")
    if isinstance(expected, bool):
        return bool(got) is expected
    if isinstance(expected, int | float):
        try:
            return abs(float(got) - float(expected)) < 1e-6
        except (TypeError, ValueError):
            return False
    if isinstance(expected, list):
        return isinstance(got, list) and [str(g) for g in got] == [str(e) for e in expected]
    return str(got) == str(expected)


def run_xml(corpus: Path) -> tuple[Counter[str], Counter[str], list[str], int, int]:
    agree: Counter[str] = Counter()
    total: Counter[str] = Counter()
    disagreements: list[str] = []
    samples = errors = 0
    for channel, folder, expected_file in (
        ("wechat", "xml_official_account", "expected_xml_official_account.json"),
        ("wecom", "xml_work", "expected_xml_work.json"),
    ):
        messages: dict[str, CanonicalMessage] = {}
        for path in sorted((corpus / folder).glob("*.xml")):
            samples += 1
            try:
                [messages[path.name]] = normalize(_envelope(channel, path.read_bytes()))
            except Exception as exc:  # a runner reports every failure and goes on
                errors += 1
                disagreements.append(f"{folder}/{path.name}: normalize raised {type(exc).__name__}: {exc}")
        for test in json.loads((corpus / expected_file).read_text(encoding="utf-8")):
            files, assertions = test["xml_files"], test["assertions"]
            # A multi-file test repeats its assertions once per file, in file order.
            size = len(assertions) // len(files) if len(assertions) % len(files) == 0 else len(assertions)
            for position, assertion in enumerate(assertions):
                name = files[min(position // max(size, 1), len(files) - 1)]
                message = messages.get(name)
                if "raw" in assertion:
                    _class_check(assertion["raw"], name, message, agree, total, disagreements, folder)
                    continue
                key = f"{channel}:{assertion['target'].split('.', 1)[-1]}"
                total[key] += 1
                if message is None:
                    disagreements.append(f"{folder}/{name}: {assertion['target']} (no message)")
                    continue
                got, source = ours(message, assertion["target"])
                if agrees(assertion["equals"], got):
                    agree[key] += 1
                else:
                    shown = "<absent>" if got is MISSING else repr(got)
                    disagreements.append(
                        f"{folder}/{name}: {assertion['target']} expected {assertion['equals']!r}, "
                        f"ours ({source}) {shown}"
                    )
    return agree, total, disagreements, samples, errors


def _class_check(
    raw: str, name: str, message: CanonicalMessage | None, agree: Counter[str],
    total: Counter[str], disagreements: list[str], folder: str,
) -> None:
    """``isinstance(msg, XEvent)`` -> our kind is "event"; ``UnknownMessage`` -> kept with raw XML."""
    match = re.search(r"isinstance\((?:msg|event), (?:events\.)?(\w+)\)", raw)
    if match is None or message is None:
        total["(other raw assertions, not comparable)"] += 1
        return
    cls = match.group(1)
    if cls == "UnknownMessage":
        ok = message.kind == "message" and "xml" in message.extra
    else:
        ok = message.kind == "event"
    total["class"] += 1
    if ok:
        agree["class"] += 1
    else:
        disagreements.append(f"{folder}/{name}: class {cls}: ours kind={message.kind}")


def run_vectors(corpus: Path) -> tuple[int, int, list[str]]:
    vectors = json.loads((corpus / "crypto_vectors.json").read_text(encoding="utf-8"))["vectors"]
    ok = 0
    problems: list[str] = []
    for vector in vectors:
        timestamp = vector.get("timestamp") or vector.get("sample_timestamp") or "0"
        security = CallbackSecurity(
            flavor="wecom" if vector["kind"].startswith("wecom") else "official_account",
            receive_id=vector["receive_id"], tokens=[vector["token"]], aes_keys=[vector["encoding_aes_key"]],
            clock=functools.partial(float, timestamp),
        )
        try:
            _vector(security, vector)
            ok += 1
        except Exception as exc:
            problems.append(f"{vector['id']}: {type(exc).__name__}: {exc}")
    return ok, len(vectors), problems


def _vector(security: CallbackSecurity, v: Mapping[str, Any]) -> None:
    kind = v["kind"]
    if kind == "wecom_verify_url" or kind.endswith("decrypt_message"):
        encrypt = v["echostr"] if "echostr" in v else extract_encrypt(v["post_body"].encode())
        call = (v["msg_signature"], v["timestamp"], v["nonce"], encrypt)
        if v.get("expect") == "invalid_signature":
            try:
                security.verify_msg(*call)
            except BadSignature:
                return
            raise AssertionError("a bad signature verified")
        security.verify_msg(*call)
        plain = security.decrypt(encrypt)
        expected = v.get("decrypted_echostr") or v.get("decrypted_plaintext")
        if plain != expected:
            raise AssertionError(f"decrypted {plain[:40]!r}")
    elif kind == "wecom_encrypt_reply":
        signed = signature(v["token"], v["timestamp"], v["nonce"], v["expected_encrypt"])
        if signed != v["expected_msg_signature"]:
            raise AssertionError("signature differs")
        if security.decrypt(v["expected_encrypt"]) != v["plaintext"]:
            raise AssertionError("decryption differs")
    elif kind == "mp_encrypt_fixed_random":
        expected = v["expected_msg_signature_for_sample_ts_nonce"]
        if signature(v["token"], v["sample_timestamp"], v["sample_nonce"], v["expected_encrypt"]) != expected:
            raise AssertionError("signature differs")
        if security.decrypt(v["expected_encrypt"]) != v["plaintext"]:
            raise AssertionError("decryption differs")
    else:
        raise AssertionError(f"unknown kind {kind}")


def main(argv: list[str]) -> int:
    default = Path(__file__).resolve().parents[2] / "shared" / "corpora"
    corpus = (Path(argv[1]) if len(argv) > 1 else default) / "wechatpy"
    if not corpus.is_dir():
        print(f"corpus not found: {corpus}")
        return 0
    agree, total, disagreements, samples, errors = run_xml(corpus)
    print(f"XML samples: {samples} normalized, {errors} raised")
    print(f"{'field':48} agree / total")
    for key in sorted(total):
        print(f"  {key:46} {agree[key]:5} / {total[key]}")
    print(f"  {'ALL comparable assertions':46} {sum(agree.values()):5} / "
          f"{sum(v for k, v in total.items() if not k.startswith('('))}")
    ok, count, problems = run_vectors(corpus)
    print(f"crypto vectors: {ok} / {count} agree")
    print(f"\ndisagreements ({len(disagreements) + len(problems)}):")
    for line in [*disagreements, *problems]:
        print(f"  - {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
