"""Who may see the status page: the admin token, typed once into a login form, then a session cookie.

The cookie never holds the token. It is ``<expiry>.<nonce>.<mac>``, the MAC keyed with a key
derived from the token, so every instance that shares the token accepts it (no session store, any
instance behind a load balancer), and changing the token ends every session at once. Scripts may
send ``Authorization: Bearer <token>`` instead. Comparisons are constant-time on fixed-length
digests; failures are limited per client IP as for API keys.

A request authenticated by the cookie must also carry the page's CSRF token (a MAC of the session)
on anything that changes state: a cross-site form can make the browser send the cookie, never a
header with a value only the page knows.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable

from aiohttp import web

from core.http import ClientAddress, RateLimiter, header_bytes
from core.settings import AdminSettings, ServerSettings

logger = logging.getLogger(__name__)

COOKIE = "tg_status"
CSRF_HEADER = "X-CSRF-Token"


class AdminAuth:
    """The one check of ``[admin] token`` for everything under ``/status``."""

    def __init__(
        self, admin: AdminSettings, server: ServerSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        if admin.token is None:
            raise ValueError("the status page needs [admin] token")
        token = admin.token.get_secret_value().strip()
        self._digest = hashlib.sha256(token.encode()).digest()
        # A key of its own for the cookies, so a cookie's MAC says nothing about the token.
        self._key = hmac.new(token.encode(), b"ticketgate status session v1", hashlib.sha256).digest()
        self._lifetime = admin.session_lifetime
        self._clock = clock
        self.client = ClientAddress(server.trusted_proxies)
        self.failures = RateLimiter(
            per_minute=admin.auth_failures_per_minute, burst=admin.auth_failures_burst
        )
        self.secure_cookie = (server.public_url or "").startswith("https://")

    @property
    def lifetime(self) -> float:
        return self._lifetime

    def token_matches(self, given: str | bytes) -> bool:
        raw = given.encode("utf-8", "surrogateescape") if isinstance(given, str) else given
        return hmac.compare_digest(hashlib.sha256(raw.strip()).digest(), self._digest)

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        payload = f"{int(self._clock() + self._lifetime)}.{secrets.token_urlsafe(12)}"
        return f"{payload}.{self._mac(payload)}"

    def session_valid(self, value: str | None) -> bool:
        if not value:
            return False
        payload, _, mac = value.rpartition(".")
        expiry, _, _nonce = payload.partition(".")
        if not mac or not expiry.isdigit():
            return False
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return False
        return int(expiry) > self._clock()

    def csrf_token(self, session: str) -> str:
        return self._mac(f"csrf:{session}")

    def bearer(self, request: web.Request) -> bool:
        """Whether the request carries ``Authorization: Bearer <admin token>``."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(token.strip()) and self.token_matches(header_bytes(token))

    def session(self, request: web.Request) -> str | None:
        """The request's valid session cookie, or ``None``."""
        value = request.cookies.get(COOKIE)
        return value if self.session_valid(value) else None

    def allowed(self, request: web.Request, *, changes_state: bool = False) -> bool:
        """Whether the request may see the page (and, ``changes_state``, act on it)."""
        if self.bearer(request):
            return True
        session = self.session(request)
        if session is None:
            return False
        if not changes_state:
            return True
        given = request.headers.get(CSRF_HEADER, "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, self.csrf_token(session).encode())

    def failed(self, request: web.Request, what: str) -> float:
        """Count a failed authentication from the request's client; seconds to wait when past the
        limit (then answer 429), else 0."""
        remote = self.client(request)
        logger.warning("status page: %s from %s", what, remote)
        return self.failures.acquire(remote or "unknown")

    def set_session(self, response: web.StreamResponse) -> None:
        response.set_cookie(
            COOKIE, self.new_session(), max_age=int(self._lifetime), path="/status", httponly=True,
            samesite="Strict", secure=self.secure_cookie,
        )

    def clear_session(self, response: web.StreamResponse) -> None:
        response.del_cookie(COOKIE, path="/status")
