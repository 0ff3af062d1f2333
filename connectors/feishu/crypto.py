"""Feishu's callback security: ``X-Lark-Signature`` and the encrypted body.

The signature is the hex SHA-256 of ``timestamp + nonce + encrypt_key`` followed by the raw body;
an encrypted body is ``{"encrypt": base64(iv + AES-256-CBC(PKCS#7(plaintext)))}`` with the key
SHA-256(encrypt_key). Written here (a dozen lines on ``cryptography``) rather than taken from
lark-oapi, whose dispatcher parses and decrypts before it checks the signature and checks neither
the timestamp window nor replays.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class DecryptError(ValueError):
    """The ``encrypt`` field does not decrypt with the key."""


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


def signature_matches(
    offered: str, timestamp: str, nonce: str, keys: tuple[str, ...], body: bytes
) -> str | None:
    """The key that signed ``body`` (every key is tried, so timing does not say which), or ``None``."""
    matched: str | None = None
    given = offered.strip().lower().encode("ascii", "replace")
    for key in keys:
        if hmac.compare_digest(signature(timestamp, nonce, key, body).encode(), given) and matched is None:
            matched = key
    return matched


def _key(encrypt_key: str) -> bytes:
    return hashlib.sha256(encrypt_key.encode()).digest()


def decrypt(encrypted: str, encrypt_key: str) -> bytes:
    try:
        raw = base64.b64decode(encrypted, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DecryptError("encrypt is not base64") from exc
    if len(raw) < 32 or len(raw) % 16:
        raise DecryptError("encrypt has the wrong length")
    decryptor = Cipher(algorithms.AES(_key(encrypt_key)), modes.CBC(raw[:16])).decryptor()
    padded = decryptor.update(raw[16:]) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError as exc:
        raise DecryptError("wrong key or corrupt ciphertext") from exc


def encrypt(plaintext: bytes, encrypt_key: str, iv: bytes | None = None) -> str:
    """What Feishu puts in ``encrypt`` (for tests, the CLI guide and the local servers)."""
    iv = iv or os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(_key(encrypt_key)), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + encryptor.update(padded) + encryptor.finalize()).decode()
