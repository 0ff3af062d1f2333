"""``/status``: the built-in status page for ops, behind the admin token (``[admin] token``).

Routes:

- ``GET /status``: the page (HTML, English or Chinese); without a session, a redirect to the login;
- ``GET|POST /status/login``, ``POST /status/logout``: the admin token in, a session cookie out;
- ``GET /status/api/summary``: every figure the page shows, as JSON (the page polls it);
- ``GET /status/api/quarantine/{id}`` (and ``/raw``): a quarantined message, as ``quarantine show``;
- ``POST /status/api/quarantine/{id}/replay`` with ``{"confirm": id}``: as ``quarantine replay``.

The API answers a session cookie (plus the page's CSRF token on the POST) or ``Authorization:
Bearer <admin token>``; 401 (429 past the failure limit) otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from urllib.parse import parse_qs

from aiohttp import web

from core.errors import ConfigError, StoreError, TooLarge
from core.http import json_error, json_response, read_body, refuse_credentials, retry_after_value
from core.settings import Settings
from gateway import quarantine
from gateway.desk.api import CHANNEL as DESK_CHANNEL
from gateway.desk.api import IdentityChannelSettings
from gateway.keys import PIPELINE, REGISTRY, SETTINGS, STORE
from gateway.status import data
from gateway.status.auth import AdminAuth
from gateway.status.page import LANGUAGES, STRINGS, login_page, pick_language, status_page

logger = logging.getLogger(__name__)

STATUS_AUTH = web.AppKey("status_auth", AdminAuth)
LANG_COOKIE = "tg_lang"
# What the page shows of a quarantined message's raw bytes; the rest is a download.
RAW_PREVIEW = 16 * 1024
_LOGIN_BODY_LIMIT = 4096
_CHALLENGE = 'Bearer realm="ticketgate-status"'


def _lang(request: web.Request) -> str:
    chosen = request.query.get("lang") or request.cookies.get(LANG_COOKIE)
    return pick_language(request.headers.get("Accept-Language"), chosen)


def _remember_lang(request: web.Request, response: web.StreamResponse) -> None:
    """The switch (``?lang=``) is kept in a cookie, so the choice outlives the page it was made on."""
    chosen = request.query.get("lang")
    if chosen in LANGUAGES:
        response.set_cookie(LANG_COOKIE, chosen, max_age=365 * 86400, path="/status", samesite="Lax")


async def _form_field(request: web.Request, name: str) -> str | None:
    """One field of a small urlencoded form; ``None`` when the body is too large or not a form."""
    try:
        body = await read_body(request, _LOGIN_BODY_LIMIT)
        fields = parse_qs(body.decode("utf-8", "surrogateescape"), max_num_fields=8)
    except (TooLarge, ValueError):
        return None
    return (fields.get(name) or [""])[0]


def _auth(request: web.Request) -> AdminAuth:
    return request.app[STATUS_AUTH]


def _refusal(request: web.Request) -> web.Response:
    auth = _auth(request)
    present = "Authorization" in request.headers
    return refuse_credentials(
        auth.failures, auth.client(request), present=present, challenge=_CHALLENGE, required="the admin token"
    )


async def page(request: web.Request) -> web.StreamResponse:
    auth = _auth(request)
    lang = _lang(request)
    session = auth.session(request)
    if session is None and not auth.bearer(request):
        response = web.HTTPSeeOther(f"/status/login?lang={lang}")
        _remember_lang(request, response)
        raise response
    initial = await data.summary(request.app)
    made = status_page(lang, csrf=auth.csrf_token(session) if session else "", initial=initial)
    _remember_lang(request, made)
    return made


async def login_form(request: web.Request) -> web.StreamResponse:
    lang = _lang(request)
    if _auth(request).session(request) is not None:
        raise web.HTTPSeeOther(f"/status?lang={lang}")
    made = login_page(lang)
    _remember_lang(request, made)
    return made


async def login(request: web.Request) -> web.StreamResponse:
    auth = _auth(request)
    lang = _lang(request)
    given = await _form_field(request, "token")
    if given and auth.token_matches(given):
        logger.info("status page: signed in from %s", auth.client(request))
        response = web.HTTPSeeOther(f"/status?lang={lang}")
        auth.set_session(response)
        raise response
    wait = auth.failed(request, "wrong admin token at sign-in")
    if wait > 0:
        made = login_page(lang, error=STRINGS[lang]["login_limited"].format(seconds=retry_after_value(wait)),
                          status=429)
        made.headers["Retry-After"] = retry_after_value(wait)
        return made
    return login_page(lang, error=STRINGS[lang]["login_wrong"], status=401)


async def logout(request: web.Request) -> web.StreamResponse:
    auth = _auth(request)
    session = auth.session(request)
    csrf = await _form_field(request, "csrf") or ""
    if session is not None and not hmac.compare_digest(csrf.encode(), auth.csrf_token(session).encode()):
        return json_error(403, "forbidden", "sign out from the status page itself")
    response = web.HTTPSeeOther(f"/status/login?lang={_lang(request)}")
    auth.clear_session(response)
    raise response


async def summary(request: web.Request) -> web.Response:
    if not _auth(request).allowed(request):
        return _refusal(request)
    return json_response(await data.summary(request.app), headers={"Cache-Control": "no-store"})


async def quarantine_show(request: web.Request) -> web.Response:
    if not _auth(request).allowed(request):
        return _refusal(request)
    try:
        found = await quarantine.show(request.app[STORE], request.match_info["id"])
    except StoreError as exc:
        logger.error("status page: quarantined %s cannot be read: %s", request.match_info["id"], exc.reason)
        return json_error(503, "store_error", exc.reason)
    if found is None:
        return json_error(404, "not_found", "no quarantined message has this id")
    record, envelope = found
    preview = envelope.body[:RAW_PREVIEW]
    info = {
        **quarantine.record_info(record, envelope),
        "raw_preview": preview.decode("utf-8", "replace"),
        "raw_preview_bytes": len(preview),
        "raw_truncated": len(envelope.body) > RAW_PREVIEW,
    }
    return json_response(info, headers={"Cache-Control": "no-store"})


async def quarantine_raw(request: web.Request) -> web.Response:
    if not _auth(request).allowed(request):
        return _refusal(request)
    try:
        found = await quarantine.show(request.app[STORE], request.match_info["id"])
    except StoreError as exc:
        logger.error("status page: quarantined %s cannot be read: %s", request.match_info["id"], exc.reason)
        return json_error(503, "store_error", exc.reason)
    if found is None:
        return json_error(404, "not_found", "no quarantined message has this id")
    record, envelope = found
    # The sender's bytes: a download, never rendered in the page's origin.
    return web.Response(
        body=envelope.body,
        content_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{record.id}.raw"',
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox; default-src 'none'",
            "Cache-Control": "no-store",
        },
    )


async def quarantine_replay(request: web.Request) -> web.Response:
    auth = _auth(request)
    if not auth.allowed(request):
        return _refusal(request)
    if not auth.allowed(request, changes_state=True):
        return json_error(403, "forbidden", "a replay from the page needs the page's CSRF token")
    quarantine_id = request.match_info["id"]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("confirm") != quarantine_id:
        return json_error(
            400, "confirmation_required", 'confirm the replay: send {"confirm": "<the same id>"}'
        )
    app = request.app
    settings = app[SETTINGS]
    registry = app[REGISTRY]
    try:
        result = await quarantine.replay(
            app[STORE], app[PIPELINE], lambda channel: registry.normalizer(channel, settings), quarantine_id
        )
    except StoreError as exc:
        logger.error("status page: replay of %s failed: %s", quarantine_id, exc.reason)
        return json_error(503, "store_error", exc.reason)
    if result is None:
        return json_error(404, "not_found", "no quarantined message has this id")
    logger.info("status page: replayed %s from %s: %s", quarantine_id, auth.client(request), result.summary)
    return json_response({
        "id": result.id, "outcome": result.outcome, "reason": result.reason, "stored": result.stored,
        "summary": result.summary,
    })


async def status_off(request: web.Request) -> web.Response:
    return json_error(404, "not_found", "the status page is off: set [admin] token in the configuration")


def _check_token_is_its_own(settings: Settings) -> None:
    """The admin token may be no desk key and not the blob token: whoever holds those must not get
    the page (it replays messages), and one leaked secret must not open both."""
    assert settings.admin.token is not None
    token = settings.admin.token.get_secret_value().strip()
    others: list[tuple[str, str]] = []
    if settings.server.blob_token is not None:
        others.append(("server.blob_token", settings.server.blob_token.get_secret_value()))
    desk = settings.channel(DESK_CHANNEL, IdentityChannelSettings)
    if desk is not None:
        others += [("channels.identity.keys", k.get_secret_value()) for k in desk.keys]
        for tenant, scoped in desk.tenants.items():
            where = f"channels.identity.tenants.{tenant}.keys"
            others += [(where, k.get_secret_value()) for k in scoped.keys]
    mine = hashlib.sha256(token.encode()).digest()
    for where, value in others:
        if hashlib.sha256(value.strip().encode()).digest() == mine:
            raise ConfigError(f"the admin token is also {where}; give the status page a token of its own",
                              file=settings.source, key="admin.token")


def setup_status(app: web.Application) -> bool:
    """Mount ``/status`` when ``[admin] token`` is set; whether it was."""
    settings = app[SETTINGS]
    if settings.admin.token is None:
        app.router.add_get("/status", status_off)
        return False
    _check_token_is_its_own(settings)
    app[STATUS_AUTH] = AdminAuth(settings.admin, settings.server)
    data.setup_data(app)
    app.router.add_get("/status", page)
    app.router.add_get("/status/login", login_form)
    app.router.add_post("/status/login", login)
    app.router.add_post("/status/logout", logout)
    app.router.add_get("/status/api/summary", summary)
    app.router.add_get("/status/api/quarantine/{id}", quarantine_show)
    app.router.add_get("/status/api/quarantine/{id}/raw", quarantine_raw)
    app.router.add_post("/status/api/quarantine/{id}/replay", quarantine_replay)
    return True
