"""The Slack Web API calls the channel makes, through slack-sdk's ``AsyncWebClient``.

users.info (the author's profile email and name), files.info and the file download (with the bot
token, only from ``file_hosts``), chat.postMessage (replies) and apps.connections.open (Socket
Mode, with the app-level token). The base URL is the channel's ``api_base``, so tests point every
call at a local server. slack-sdk's own retry handlers are off: the media queue, the reply
dispatcher and Slack's redeliveries do the retrying, each with its own pacing. Tokens are never
logged; errors carry the method and Slack's error code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from core.channel import HttpClient

# Slack's error codes that a later attempt cannot fix, and those that say our token is wrong.
AUTH_ERRORS = frozenset({
    "invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired", "no_permission",
    "missing_scope", "not_allowed_token_type", "ekm_access_denied", "team_access_not_granted",
})


TRANSIENT_ERRORS = frozenset({
    "unreachable", "ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout",
})


class SlackError(Exception):
    """A Web API call failed: Slack's ``error`` code (``unreachable`` when Slack was not reached)."""

    def __init__(
        self, method: str, error: str, *, status: int = 200, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{method}: {error}")
        self.method = method
        self.error = error
        self.status = status
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        """Worth trying again: unreachable, rate-limited, or Slack's own trouble."""
        return (
            self.error in TRANSIENT_ERRORS
            or self.status == 429
            or self.status >= 500
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """What users.info says about a person (empty when it says nothing we can use)."""

    email: str | None = None
    display_name: str | None = None
    real_name: str | None = None
    is_bot: bool = False

    def as_meta(self) -> dict[str, Any]:
        return {k: v for k, v in (("email", self.email), ("display_name", self.display_name),
                                  ("real_name", self.real_name)) if v}


@dataclass(slots=True, kw_only=True)
class WebApi:
    """One token's Web API (a bot token, or the app-level token for Socket Mode)."""

    http: HttpClient
    token: str = field(repr=False)
    timeout: float = 15.0
    _client: AsyncWebClient | None = field(default=None, repr=False)
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    def client(self) -> AsyncWebClient:
        """The SDK client on the gateway's session for this API (made inside the running loop)."""
        session = self.http.session
        if self._client is None or self._session is not session:
            self._client = AsyncWebClient(
                token=self.token, base_url=self.http.base_url + "/", timeout=int(max(self.timeout, 1)),
                session=session, retry_handlers=[],
            )
            self._session = session
        return self._client

    async def call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        """Call ``method``; its answer's data, or :class:`SlackError`."""
        client = self.client()
        try:
            response = await getattr(client, method.replace(".", "_"))(**kwargs)
        except SlackApiError as exc:
            answer = exc.response
            data = answer.data if isinstance(answer.data, dict) else {}
            retry_after = _seconds(answer.headers.get("Retry-After") if answer.headers else None)
            error = str(data.get("error") or f"http_{answer.status_code}")
            raise SlackError(method, error, status=answer.status_code, retry_after=retry_after) from None
        except (SlackClientError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise SlackError(method, "unreachable", status=0, retry_after=None) from exc
        return cast(dict[str, Any], response.data if isinstance(response.data, dict) else {})

    async def profile(self, user: str) -> Profile:
        data = await self.call("users.info", user=user)
        person = data.get("user")
        if not isinstance(person, dict):
            return Profile()
        found = person.get("profile")
        details: dict[str, Any] = found if isinstance(found, dict) else {}
        email = details.get("email")
        return Profile(
            email=email if isinstance(email, str) and "@" in email else None,
            display_name=_text(details.get("display_name")),
            real_name=_text(details.get("real_name")) or _text(person.get("real_name")),
            is_bot=person.get("is_bot") is True,
        )

    async def file_info(self, file_id: str) -> dict[str, Any]:
        data = await self.call("files.info", file=file_id)
        file = data.get("file")
        if not isinstance(file, dict):
            raise SlackError("files.info", "no_file_object")
        return file

    async def download(self, url: str, *, max_bytes: int, hosts: frozenset[str]) -> tuple[bytes, str | None]:
        """GET a file's private URL with the token; only from ``hosts``, at most ``max_bytes``."""
        if (urlsplit(url).hostname or "").lower() not in hosts:
            raise SlackError("download", "host_not_allowed")
        limit = aiohttp.ClientTimeout(total=self.timeout)
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            get = self.http.session.get(url, headers=headers, timeout=limit, allow_redirects=False)
            async with get as response:
                if response.status != 200:
                    # Slack answers a token it refuses with a redirect to its sign-in page.
                    error = "not_authed" if 300 <= response.status < 400 else f"http_{response.status}"
                    raise SlackError("download", error, status=response.status,
                                     retry_after=_seconds(response.headers.get("Retry-After")))
                if response.content_length is not None and response.content_length > max_bytes:
                    raise SlackError("download", "too_large", status=413)
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > max_bytes:
                        raise SlackError("download", "too_large", status=413)
                    chunks.append(chunk)
                content_type = response.headers.get("Content-Type")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SlackError("download", "unreachable", status=0) from exc
        return b"".join(chunks), content_type


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _seconds(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None
