"""Callback verification and decryption for WeChat Official Accounts and WeCom.

The signature is WeChat's documented one: SHA-1 over the sorted, concatenated token, timestamp,
nonce (and, for ``msg_signature``, the ``Encrypt`` value). It is computed here with a fixed
algorithm and compared in constant time, before anything of the body is parsed. AES (safe and
compatible modes, and all of WeCom) goes through wechatpy's ``PrpCrypto``, which also checks the
receive id (AppID / CorpID) at the end of the plaintext.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from connectors.base import any_secret_matches
from core.errors import InvalidInput, VerificationError

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
Flavor = Literal["official_account", "wecom"]

# The Encrypt element of a callback body, found without an XML parser so that the signature can be
# checked before the body is parsed. Its value is base64, so the pattern is exact.
_ENCRYPT = re.compile(rb"<Encrypt>\s*(?:<!\[CDATA\[([A-Za-z0-9+/=]+)\]\]>|([A-Za-z0-9+/=]+))\s*</Encrypt>")
# The same for a JSON body (Mini Programs in JSON format): {"ToUserName": ..., "Encrypt": "..."}.
# A JSON encoder may escape "/" as "\/" (JSON allows both): accepted and unescaped.
_JSON_ENCRYPT = re.compile(rb'"Encrypt"\s*:\s*"((?:[A-Za-z0-9+/=]|\\/)+)"')
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_DIGITS = re.compile(r"^\d{1,12}$")


class BadSignature(VerificationError):
    """The signature does not match any configured token (HTTP 401)."""


class StaleTimestamp(VerificationError):
    """The signed timestamp lies outside the replay window (HTTP 403)."""


def signature(*parts: str) -> str:
    """WeChat's callback signature: hex SHA-1 of the sorted parts, concatenated."""
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8"), usedforsecurity=False).hexdigest()


def extract_encrypt(body: bytes) -> str:
    """The single ``Encrypt`` value of a callback body, without parsing it as XML."""
    if body.count(b"<Encrypt>") != 1:
        raise InvalidInput("expected exactly one Encrypt element")
    match = _ENCRYPT.search(body)
    if match is None:
        raise InvalidInput("Encrypt element is not base64")
    value = (match.group(1) or match.group(2)).decode("ascii")
    if len(value) % 4 or not _BASE64.match(value):
        raise InvalidInput("Encrypt element is not base64")
    return value


def extract_json_encrypt(body: bytes) -> str:
    """The single ``Encrypt`` value of a JSON callback body, without parsing it as JSON."""
    if body.count(b'"Encrypt"') != 1:
        raise InvalidInput("expected exactly one Encrypt member")
    match = _JSON_ENCRYPT.search(body)
    if match is None:
        raise InvalidInput("Encrypt member is not base64")
    value = match.group(1).decode("ascii").replace("\\/", "/")
    if len(value) % 4 or not _BASE64.match(value):
        raise InvalidInput("Encrypt member is not base64")
    return value


@dataclass(frozen=True, slots=True)
class CallbackSecurity:
    """Verifies and decrypts the callbacks of one account or app.

    ``tokens`` and ``aes_keys`` list the current secret first and the previous one (during a
    rotation) second; any of them is accepted.
    """

    flavor: Flavor
    receive_id: str  # AppID (Official Account) or CorpID (WeCom): the tail of every plaintext
    tokens: Sequence[str] = field(repr=False)
    aes_keys: Sequence[str] = field(repr=False, default=())
    replay_window: float = 300.0
    clock: Clock = field(default=lambda: 0.0, repr=False)

    def _check(self, given: str, *parts: str) -> None:
        def expected(token: str) -> bytes:
            return signature(token, *parts).encode("ascii")

        if not any_secret_matches(self.tokens, expected, given.encode("ascii", "replace")):
            raise BadSignature("signature does not match")

    def check_timestamp(self, timestamp: str) -> None:
        """Refuse a (signed) timestamp outside the replay window."""
        if not _DIGITS.match(timestamp):
            raise StaleTimestamp("timestamp is not a number of seconds")
        if abs(self.clock() - int(timestamp)) > self.replay_window:
            raise StaleTimestamp("timestamp outside the replay window")

    def verify(self, sig: str, timestamp: str, nonce: str) -> None:
        """The plain ``signature`` (handshake, plaintext mode): it covers no body."""
        self._check(sig, timestamp, nonce)
        self.check_timestamp(timestamp)

    def verify_msg(self, msg_signature: str, timestamp: str, nonce: str, encrypt: str) -> None:
        """``msg_signature``: covers the ``Encrypt`` value (or the WeCom ``echostr``)."""
        self._check(msg_signature, timestamp, nonce, encrypt)
        self.check_timestamp(timestamp)

    def decrypt(self, encrypt: str) -> str:
        """AES-decrypt a verified ``Encrypt`` value with wechatpy, trying each configured key."""
        if not self.aes_keys:
            raise InvalidInput("encrypted delivery, but no EncodingAESKey is configured")
        if len(encrypt) % 4 or not _BASE64.match(encrypt):
            raise InvalidInput("ciphertext is not base64")
        for key in self.aes_keys:
            try:
                plaintext: str = _prp(self.flavor, key).decrypt(encrypt, self.receive_id)
                return plaintext
            except Exception:  # noqa: S112 - wechatpy raises many kinds; the next key may fit
                continue
        logger.error(
            "%s callback for %s: no configured EncodingAESKey decrypts it", self.flavor, self.receive_id
        )
        raise InvalidInput("cannot decrypt with any configured EncodingAESKey")

    def encrypt(self, plaintext: str, *, key_index: int = 0) -> str:
        """Encrypt with wechatpy (tests, benchmarks and the passive-reply path)."""
        value = _prp(self.flavor, self.aes_keys[key_index]).encrypt(plaintext, self.receive_id)
        return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _prp(flavor: Flavor, encoding_aes_key: str) -> Any:
    # Imported lazily: the SDK is loaded only when a WeChat channel is configured.
    import base64

    key = base64.b64decode(encoding_aes_key + "=")
    if flavor == "wecom":
        from wechatpy.enterprise.crypto import PrpCrypto as WeComPrp

        return WeComPrp(key)
    from wechatpy.crypto import PrpCrypto

    return PrpCrypto(key)
