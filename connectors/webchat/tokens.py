"""Visitor session tokens and the site's identity signature (pure; no I/O).

**Session token.** The widget keeps ``<payload>.<mac>`` in the browser's storage and shows it on
every (re)connect and upload. ``payload`` is base64url JSON ``{"v":1,"n":inbox,"s":session,"t":issued,
"u":user_id,"e":email}`` (``u``/``e`` only for a visitor whose identity the site signed) and ``mac``
is base64url HMAC-SHA256 over the payload text with ``session_secret``. Only the gateway can mint
one, so a token proves the session (and the verified identity) without any lookup; a token of
another inbox, an expired one or a wrong MAC is refused. Two secrets are accepted during a rotation.

**Identity signature.** A site that knows its signed-in user computes on its backend
``hex(HMAC-SHA256(identity_secret, user_id))``, or over ``user_id + "\\n" + email`` when it also
vouches for the email, and gives it to the widget. :func:`check_identity` recomputes it for every
configured secret and compares with :func:`hmac.compare_digest` (constant time, same length always).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

MAX_USER_ID = 128
MAX_EMAIL = 254
MAX_TOKEN = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Session:
    """Who is on the other end of a socket or upload: a session, and the user the site vouched for."""

    inbox: str
    session: str
    issued: float
    user_id: str | None = None
    email: str | None = None

    @property
    def conversation(self) -> str:
        """Where replies are held and pushed: the signed-in user (every device), else the session."""
        return f"u:{self.user_id}" if self.user_id is not None else f"s:{self.session}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> bytes:
    return hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest()


def new_session_id() -> str:
    """128 random bits, URL-safe."""
    return _b64(secrets.token_bytes(16))


def mint(secret: bytes, session: Session) -> str:
    body: dict[str, object] = {"v": 1, "n": session.inbox, "s": session.session, "t": int(session.issued)}
    if session.user_id is not None:
        body["u"] = session.user_id
        if session.email is not None:
            body["e"] = session.email
    payload = _b64(orjson.dumps(body))
    return f"{payload}.{_b64(_mac(secret, payload))}"


def open_token(
    token: str, *, secrets_: Sequence[bytes], inbox: str, now: float, ttl: float
) -> Session | None:
    """The session ``token`` proves, or ``None`` (forged, another inbox's, expired, garbled).

    The MAC is checked against every secret before the payload is decoded."""
    if not token or len(token) > MAX_TOKEN or token.count(".") != 1:
        return None
    payload, _, mac_text = token.partition(".")
    try:
        given = _unb64(mac_text)
        payload.encode("ascii")
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return None
    valid = False
    for secret in secrets_:
        expected = _mac(secret, payload)
        # Compare every secret: timing tells nothing about which one matched.
        valid |= hmac.compare_digest(expected, given)
    if not valid:
        return None
    try:
        body = orjson.loads(_unb64(payload))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        return None
    if not isinstance(body, dict) or body.get("v") != 1 or body.get("n") != inbox:
        return None
    session, issued = body.get("s"), body.get("t")
    if not isinstance(session, str) or not isinstance(issued, int) or now - issued > ttl:
        return None
    user, email = body.get("u"), body.get("e")
    return Session(
        inbox=inbox,
        session=session,
        issued=float(issued),
        user_id=user if isinstance(user, str) else None,
        email=email if isinstance(email, str) and isinstance(user, str) else None,
    )


def identity_message(user_id: str, email: str | None) -> bytes:
    """What the site signs: the user id, or the user id and the email on two lines."""
    return (user_id if email is None else f"{user_id}\n{email}").encode("utf-8")


def sign_identity(secret: bytes, user_id: str, email: str | None = None) -> str:
    """The site's side (and the tests'): ``hex(HMAC-SHA256(secret, user_id[\\nemail]))``."""
    return hmac.new(secret, identity_message(user_id, email), hashlib.sha256).hexdigest()


def check_identity(secrets_: Sequence[bytes], user_id: str, email: str | None, signature: str) -> bool:
    """Whether ``signature`` is the site's HMAC of ``user_id`` (and ``email``) under any secret."""
    if not secrets_ or not user_id or len(user_id) > MAX_USER_ID or "\n" in user_id:
        return False
    if email is not None and (len(email) > MAX_EMAIL or "\n" in email):
        return False
    try:
        given = bytes.fromhex(signature) if len(signature) == 64 else b""
    except ValueError:
        given = b""
    message = identity_message(user_id, email)
    valid = False
    for secret in secrets_:
        expected = hmac.new(secret, message, hashlib.sha256).digest()
        valid |= hmac.compare_digest(expected, given.ljust(32, b"\0")) and len(given) == 32
    return valid
