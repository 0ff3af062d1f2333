"""Signature and AES with golden vectors (wechatpy, the WeCom docs, the official WXBizMsgCrypt sample)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from connectors.wechat.security import (
    BadSignature,
    CallbackSecurity,
    StaleTimestamp,
    extract_encrypt,
    signature,
)
from core.errors import InvalidInput
from tests.support.corpora import CORPORA as CORPORA_DIR

CORPORA = CORPORA_DIR
VECTORS = CORPORA / "wechatpy" / "crypto_vectors.json"


def _vectors() -> list[dict[str, Any]]:
    if not VECTORS.is_file():
        return []
    vectors: list[dict[str, Any]] = json.loads(VECTORS.read_text(encoding="utf-8"))["vectors"]
    return vectors


def _security(vector: dict[str, Any], *, clock: float | None = None) -> CallbackSecurity:
    timestamp = vector.get("timestamp") or vector.get("sample_timestamp") or "0"
    return CallbackSecurity(
        flavor="wecom" if vector["kind"].startswith("wecom") else "official_account",
        receive_id=vector["receive_id"],
        tokens=[vector["token"]],
        aes_keys=[vector["encoding_aes_key"]],
        replay_window=300,
        clock=lambda: float(timestamp) if clock is None else clock,
    )


@pytest.mark.skipif(not VECTORS.is_file(), reason="wechatpy corpus not present")
def test_all_vectors_present() -> None:
    assert len(_vectors()) == 9


@pytest.mark.skipif(not VECTORS.is_file(), reason="wechatpy corpus not present")
@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: v["id"])
def test_crypto_vector(vector: dict[str, Any]) -> None:
    security = _security(vector)
    kind = vector["kind"]
    if kind == "wecom_verify_url":
        call = (vector["msg_signature"], vector["timestamp"], vector["nonce"], vector["echostr"])
        if vector["expect"] == "valid":
            security.verify_msg(*call)
            assert security.decrypt(vector["echostr"]) == vector["decrypted_echostr"]
        else:
            with pytest.raises(BadSignature):
                security.verify_msg(*call)
    elif kind in ("wecom_decrypt_message", "mp_decrypt_message"):
        encrypt = extract_encrypt(vector["post_body"].encode())
        call = (vector["msg_signature"], vector["timestamp"], vector["nonce"], encrypt)
        if vector.get("expect") == "invalid_signature":
            with pytest.raises(BadSignature):
                security.verify_msg(*call)
        else:
            security.verify_msg(*call)
            assert security.decrypt(encrypt) == vector["decrypted_plaintext"]
    elif kind == "wecom_encrypt_reply":
        encrypt = vector["expected_encrypt"]
        assert signature(vector["token"], vector["timestamp"], vector["nonce"], encrypt) == vector[
            "expected_msg_signature"
        ]
        assert security.decrypt(encrypt) == vector["plaintext"]
    elif kind == "mp_encrypt_fixed_random":
        encrypt = vector["expected_encrypt"]
        assert security.decrypt(encrypt) == vector["plaintext"]
        expected = vector["expected_msg_signature_for_sample_ts_nonce"]
        parts = (vector["token"], vector["sample_timestamp"], vector["sample_nonce"], encrypt)
        assert signature(*parts) == expected
        # Our encryption round-trips through our decryption (random prefix differs each time).
        assert security.decrypt(security.encrypt(vector["plaintext"])) == vector["plaintext"]
    else:
        pytest.fail(f"unknown vector kind {kind}")


# Golden vector independent of the corpus: WeCom's documented example (token QDG6eK).
DOC = {
    "kind": "wecom_verify_url", "token": "QDG6eK", "receive_id": "wx5823bf96d3bd56c7",
    "encoding_aes_key": "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C", "timestamp": "1409659589",
    "nonce": "263014780", "msg_signature": "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3",
    "echostr": "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ==",
}


def test_documented_wecom_url_verification() -> None:
    security = _security(DOC)
    security.verify_msg(DOC["msg_signature"], DOC["timestamp"], DOC["nonce"], DOC["echostr"])
    assert security.decrypt(DOC["echostr"]) == "1616140317555161061"


def test_replay_window_uses_the_injected_clock() -> None:
    args = (DOC["msg_signature"], DOC["timestamp"], DOC["nonce"], DOC["echostr"])
    _security(DOC, clock=float(DOC["timestamp"]) + 300).verify_msg(*args)
    with pytest.raises(StaleTimestamp):
        _security(DOC, clock=float(DOC["timestamp"]) + 301).verify_msg(*args)
    with pytest.raises(StaleTimestamp):
        _security(DOC, clock=float(DOC["timestamp"]) - 301).verify_msg(*args)


def test_either_token_of_a_rotation_verifies() -> None:
    security = CallbackSecurity(
        flavor="wecom", receive_id=DOC["receive_id"], tokens=["newtoken", DOC["token"]],
        aes_keys=[DOC["encoding_aes_key"]], clock=lambda: float(DOC["timestamp"]),
    )
    security.verify_msg(DOC["msg_signature"], DOC["timestamp"], DOC["nonce"], DOC["echostr"])
    with pytest.raises(BadSignature):
        security.verify_msg("x" * 40, DOC["timestamp"], DOC["nonce"], DOC["echostr"])


def test_decrypt_with_wrong_receive_id_or_key_is_invalid_input() -> None:
    wrong_id = CallbackSecurity(
        flavor="wecom", receive_id="wxOTHER", tokens=[DOC["token"]], aes_keys=[DOC["encoding_aes_key"]]
    )
    with pytest.raises(InvalidInput):
        wrong_id.decrypt(DOC["echostr"])
    wrong_key = CallbackSecurity(
        flavor="wecom", receive_id=DOC["receive_id"], tokens=[DOC["token"]],
        aes_keys=["abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"],
    )
    with pytest.raises(InvalidInput):
        wrong_key.decrypt(DOC["echostr"])
    with pytest.raises(InvalidInput):
        wrong_key.decrypt("not base64!")


@pytest.mark.parametrize(
    "body",
    [
        b"<xml></xml>",
        b"<xml><Encrypt>abcd</Encrypt><Encrypt>abcd</Encrypt></xml>",
        b"<xml><Encrypt>&a;</Encrypt></xml>",
        b"<xml><Encrypt>abc</Encrypt></xml>",
    ],
)
def test_extract_encrypt_refuses_anything_but_one_base64_value(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        extract_encrypt(body)
