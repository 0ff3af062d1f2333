"""OAuth 1.0a request signing (RFC 5849, HMAC-SHA1) for X's user-context calls.

X authenticates the DM endpoints and the DM media host (ton.twitter.com) with OAuth 1.0a in the
account's user context: the app's consumer key and secret plus the account's access token and
secret. Forty lines of our own instead of a dependency; tested against X's published example.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit


def _enc(value: str) -> str:
    """RFC 3986 percent-encoding, as OAuth 1.0a wants it (only unreserved characters stay)."""
    return quote(value, safe="-._~")


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuth1:
    """One account's credentials; ``header`` signs one request."""

    consumer_key: str
    consumer_secret: str = field(repr=False)
    token: str
    token_secret: str = field(repr=False)

    def header(
        self, method: str, url: str, *, form: Mapping[str, str] | None = None,
        nonce: str | None = None, timestamp: int | None = None,
    ) -> str:
        """The ``Authorization`` value for ``method url``; ``form`` are urlencoded body parameters
        (a JSON body is not signed)."""
        oauth = {
            "oauth_consumer_key": self.consumer_key,
            "oauth_nonce": nonce or secrets.token_hex(16),
            "oauth_signature_method": "HMAC-SHA1",
            "oauth_timestamp": str(timestamp if timestamp is not None else int(time.time())),
            "oauth_token": self.token,
            "oauth_version": "1.0",
        }
        parts = urlsplit(url)
        params = [*parse_qsl(parts.query, keep_blank_values=True), *(form or {}).items(), *oauth.items()]
        normalized = "&".join(f"{k}={v}" for k, v in sorted((_enc(k), _enc(v)) for k, v in params))
        base_url = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, "", ""))
        base = "&".join((method.upper(), _enc(base_url), _enc(normalized)))
        key = f"{_enc(self.consumer_secret)}&{_enc(self.token_secret)}"
        digest = hmac.new(key.encode(), base.encode(), hashlib.sha1).digest()
        oauth["oauth_signature"] = base64.b64encode(digest).decode()
        return "OAuth " + ", ".join(f'{_enc(k)}="{_enc(v)}"' for k, v in sorted(oauth.items()))
