"""The status page's HTML, in English and Chinese: one document with its CSS and script inline.

Nothing is fetched from elsewhere (the page must work where the gateway runs, behind a firewall,
and a CDN would see who looks at it); the script builds the charts as SVG from the JSON it polls.
A CSP with a per-response nonce allows only that inline style and script.
"""

from __future__ import annotations

import html
import secrets
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"

STRINGS: dict[str, dict[str, str]] = {
    "en": {
        "title": "ticketgate status",
        "status": "status",
        "updated": "updated",
        "stale": "not updated: {reason}",
        "logout": "Sign out",
        "login_title": "Sign in to the status page",
        "login_token": "Admin token",
        "login_button": "Sign in",
        "login_wrong": "That is not the admin token.",
        "login_limited": "Too many failed attempts; try again in {seconds} s.",
        "login_hint": "The token is [admin] token in the gateway's configuration.",
        "broker": "Broker",
        "connected": "connected",
        "disconnected": "disconnected",
        "store": "Store",
        "store_ok": "writable",
        "store_problem": "problem",
        "outbox": "Outbox",
        "backlog": "waiting",
        "oldest": "oldest {age}",
        "of_bound": "bound {bound}",
        "published": "published (total)",
        "quarantine": "Quarantine",
        "held": "held",
        "replies": "Replies",
        "replies_waiting": "waiting",
        "replies_failed": "failed",
        "replies_sent": "sent",
        "replies_since": "sent {sent} · failed {failed} since start",
        "channels": "Channels and inboxes",
        "no_channels": "No channel is configured: nothing can arrive.",
        "deadline": "provider waits {deadline}",
        "ack": "Ack latency",
        "in_time": "{share} answered in time",
        "no_acks": "no acks yet",
        "worst_hour": "slowest in the last hour: {value}",
        "refusals": "Refusals",
        "refusals_title": "refusals by reason: since start (last hour)",
        "channel": "Channel",
        "reason_signature": "signature",
        "reason_auth": "auth",
        "reason_size": "size",
        "reason_rate_limit": "rate limit",
        "reason_malformed": "malformed",
        "total": "since start",
        "last_hour": "last hour",
        "inbox": "Inbox",
        "no_inbox": "(before an inbox is known)",
        "messages_hour": "Messages, last hour",
        "last_message": "Last message",
        "never": "none yet",
        "stored": "stored",
        "rejected": "refused",
        "retry": "retry",
        "minute": "minute",
        "q_empty": "The quarantine is empty.",
        "q_id": "Id",
        "q_received": "Received",
        "q_where": "Channel / inbox",
        "q_size": "Size",
        "q_reason": "Reason",
        "q_state": "State",
        "q_held": "held",
        "q_replayed": "replayed",
        "q_show": "Show",
        "q_replay": "Replay",
        "q_download": "Download raw bytes",
        "q_close": "Close",
        "q_raw": "Raw message (first {n} bytes, as text)",
        "q_shown": "the newest {n}",
        "q_total": "{total} in all, {replayed} replayed",
        "confirm_title": "Replay this message?",
        "confirm_text": "It is normalized again with the channel's current code and, if it is accepted, "
        "its event is published to the desks. The same as `ticketgate quarantine replay {id}`.",
        "confirm_yes": "Replay",
        "confirm_no": "Cancel",
        "replayed": "Replayed {id}: {summary}",
        "replay_failed": "Replay of {id} did not store it: {summary}",
        "error": "Error: {reason}",
        "chart_start": "60 min ago",
        "chart_end": "now",
        "outcome_accepted": "accepted",
        "outcome_duplicate": "duplicate",
        "outcome_rejected": "refused",
        "outcome_quarantined": "quarantined",
        "outcome_retry": "retry",
    },
    "zh": {
        "title": "ticketgate 运行状态",
        "status": "运行状态",
        "updated": "更新于",
        "stale": "未能更新：{reason}",
        "logout": "退出",
        "login_title": "登录状态页",
        "login_token": "管理令牌",
        "login_button": "登录",
        "login_wrong": "管理令牌不正确。",
        "login_limited": "失败次数过多，请 {seconds} 秒后再试。",
        "login_hint": "令牌即网关配置中的 [admin] token。",
        "broker": "消息代理",
        "connected": "已连接",
        "disconnected": "未连接",
        "store": "存储",
        "store_ok": "可写",
        "store_problem": "故障",
        "outbox": "发件箱",
        "backlog": "待发布",
        "oldest": "最早 {age}",
        "of_bound": "上限 {bound}",
        "published": "已发布（累计）",
        "quarantine": "隔离区",
        "held": "待处理",
        "replies": "回复",
        "replies_waiting": "等待发送",
        "replies_failed": "发送失败",
        "replies_sent": "已发送",
        "replies_since": "启动以来已发送 {sent} · 失败 {failed}",
        "channels": "渠道与收件箱",
        "no_channels": "没有配置任何渠道：收不到消息。",
        "deadline": "平台等待 {deadline}",
        "ack": "确认延迟",
        "in_time": "{share} 按时应答",
        "no_acks": "尚无确认",
        "worst_hour": "近一小时最慢：{value}",
        "refusals": "拒收",
        "refusals_title": "按原因拒收：启动以来（近一小时）",
        "channel": "渠道",
        "reason_signature": "签名",
        "reason_auth": "认证",
        "reason_size": "过大",
        "reason_rate_limit": "限流",
        "reason_malformed": "格式错误",
        "total": "启动以来",
        "last_hour": "近一小时",
        "inbox": "收件箱",
        "no_inbox": "（未识别收件箱）",
        "messages_hour": "近一小时消息",
        "last_message": "最近一条消息",
        "never": "暂无",
        "stored": "已存储",
        "rejected": "已拒收",
        "retry": "请重试",
        "minute": "分钟",
        "q_empty": "隔离区为空。",
        "q_id": "编号",
        "q_received": "接收时间",
        "q_where": "渠道 / 收件箱",
        "q_size": "大小",
        "q_reason": "原因",
        "q_state": "状态",
        "q_held": "待处理",
        "q_replayed": "已重放",
        "q_show": "查看",
        "q_replay": "重放",
        "q_download": "下载原始字节",
        "q_close": "关闭",
        "q_raw": "原始消息（前 {n} 字节，按文本显示）",
        "q_shown": "最新 {n} 条",
        "q_total": "共 {total} 条，已重放 {replayed} 条",
        "confirm_title": "重放这条消息？",
        "confirm_text": "将用该渠道当前的代码重新解析；若被接受，其事件将发布给工单系统。"
        "与 `ticketgate quarantine replay {id}` 相同。",
        "confirm_yes": "重放",
        "confirm_no": "取消",
        "replayed": "已重放 {id}：{summary}",
        "replay_failed": "重放 {id} 未能存储：{summary}",
        "error": "错误：{reason}",
        "chart_start": "60 分钟前",
        "chart_end": "现在",
        "outcome_accepted": "已接收",
        "outcome_duplicate": "重复",
        "outcome_rejected": "已拒收",
        "outcome_quarantined": "已隔离",
        "outcome_retry": "请重试",
    },
}


def pick_language(accept_language: str | None, override: str | None = None) -> str:
    """``override`` (``?lang=`` or the switch's cookie) when it names a language we have; else the
    first of ours in the browser's ranking (``zh``, ``zh-CN``, ``zh-Hant`` are Chinese)."""
    if override in LANGUAGES:
        return str(override)
    ranked: list[tuple[float, int, str]] = []
    for index, item in enumerate((accept_language or "").split(",")):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                quality = 0.0
        primary = tag.strip().split("-", 1)[0].lower()
        if primary in LANGUAGES and quality > 0:
            ranked.append((-quality, index, primary))
    return min(ranked)[2] if ranked else DEFAULT_LANGUAGE


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


_CSS = _asset("status.css")
_JS = _asset("status.js")


def _json_script(element_id: str, value: Any) -> str:
    # "<" escaped, so no text in the data (a quarantine reason) can close the script element.
    text = orjson.dumps(value).decode().replace("<", "\\u003c")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _headers(nonce: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'"
        ),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
    }


def _switch(lang: str) -> str:
    links = []
    for code, label in (("en", "English"), ("zh", "中文")):
        current = ' aria-current="true"' if code == lang else ""
        links.append(f'<a href="?lang={code}" hreflang="{code}" lang="{code}"{current}>{label}</a>')
    return f'<nav class="lang">{" · ".join(links)}</nav>'


def status_page(lang: str, *, csrf: str, initial: dict[str, Any], status: int = 200) -> web.Response:
    s = STRINGS[lang]
    nonce = secrets.token_urlsafe(16)
    e = html.escape
    body = f"""<!doctype html>
<html lang="{"zh-CN" if lang == "zh" else "en"}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{e(csrf)}">
<title>{e(s["title"])}</title>
<style nonce="{nonce}">{_CSS}</style>
</head>
<body>
<header>
  <h1>ticketgate <span class="sub">{e(s["status"])}</span></h1>
  <p id="tg-updated" class="muted" aria-live="polite"></p>
  {_switch(lang)}
  <form method="post" action="/status/logout" class="logout">
    <input type="hidden" name="csrf" value="{e(csrf)}">
    <button type="submit">{e(s["logout"])}</button>
  </form>
</header>
<main>
  <section id="tg-overview" class="tiles" aria-label="{e(s["status"])}"></section>
  <section>
    <h2>{e(s["channels"])}</h2>
    <div id="tg-channels"></div>
  </section>
  <section>
    <h2>{e(s["quarantine"])} <span id="tg-q-note" class="muted"></span></h2>
    <p id="tg-q-result" role="status"></p>
    <div id="tg-quarantine"></div>
  </section>
</main>
<dialog id="tg-confirm">
  <form method="dialog">
    <h3>{e(s["confirm_title"])}</h3>
    <p id="tg-confirm-what" class="mono"></p>
    <p id="tg-confirm-text"></p>
    <menu>
      <button value="cancel" id="tg-confirm-no">{e(s["confirm_no"])}</button>
      <button value="replay" id="tg-confirm-yes" class="danger">{e(s["confirm_yes"])}</button>
    </menu>
  </form>
</dialog>
<dialog id="tg-show">
  <form method="dialog">
    <h3 id="tg-show-title" class="mono"></h3>
    <dl id="tg-show-fields"></dl>
    <p><a id="tg-show-download" href="#" download>{e(s["q_download"])}</a></p>
    <h4 id="tg-show-raw-title"></h4>
    <pre id="tg-show-raw"></pre>
    <menu><button value="close">{e(s["q_close"])}</button></menu>
  </form>
</dialog>
{_json_script("tg-strings", {"lang": lang, **s})}
{_json_script("tg-initial", initial)}
<script nonce="{nonce}">{_JS}</script>
</body>
</html>
"""
    return web.Response(text=body, content_type="text/html", status=status, headers=_headers(nonce))


def login_page(lang: str, *, error: str | None = None, status: int = 200) -> web.Response:
    s = STRINGS[lang]
    nonce = secrets.token_urlsafe(16)
    e = html.escape
    problem = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    body = f"""<!doctype html>
<html lang="{"zh-CN" if lang == "zh" else "en"}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(s["login_title"])}</title>
<style nonce="{nonce}">{_CSS}</style>
</head>
<body class="login">
<main>
  <h1>ticketgate <span class="sub">{e(s["status"])}</span></h1>
  {_switch(lang)}
  <form method="post" action="/status/login?lang={lang}" class="card">
    <h2>{e(s["login_title"])}</h2>
    {problem}
    <label for="tg-token">{e(s["login_token"])}</label>
    <input id="tg-token" name="token" type="password" autocomplete="current-password" required autofocus>
    <button type="submit">{e(s["login_button"])}</button>
    <p class="muted">{e(s["login_hint"])}</p>
  </form>
</main>
</body>
</html>
"""
    return web.Response(text=body, content_type="text/html", status=status, headers=_headers(nonce))
