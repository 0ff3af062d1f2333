"""HTML for the form channel: the form (with values and errors), the thank-you page, message pages.

Plain ``string.Template`` over packaged files, every value HTML-escaped here: the page needs no
JavaScript and no template engine. The CSS is inlined so the page is one request, and its hash goes
into the Content-Security-Policy so nothing else can style or script the page.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from html import escape
from importlib.resources import files
from string import Template

from connectors.form.i18n import STRINGS, human_size

_PACKAGE = files("connectors.form")
_FORM = Template(_PACKAGE.joinpath("templates/form.html").read_text(encoding="utf-8"))
_PAGE = Template(_PACKAGE.joinpath("templates/page.html").read_text(encoding="utf-8"))
CSS = _PACKAGE.joinpath("static/form.css").read_text(encoding="utf-8")
EMBED_JS = _PACKAGE.joinpath("static/embed.js").read_bytes()
_CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()

FIELDS = ("name", "email", "phone", "subject", "message", "attachments")
# Fields whose error sits next to them; "contact" (neither email nor phone) sits above the pair.
_LABELS = ("optional", "required", "honeypot", "submit")
_ERROR_KEYS = {("email", "invalid"): "err_invalid_email", ("phone", "invalid"): "err_invalid_phone"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Attachment bounds, shown in the hint and in errors."""

    count: int
    size: int
    total: int

    def words(self) -> dict[str, str]:
        return {"count": str(self.count), "size": human_size(self.size), "total": human_size(self.total)}


def security_headers(frame_ancestors: str) -> dict[str, str]:
    """No scripts, the inline CSS by hash, posts only to ourselves, framed only by allowed sites."""
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; form-action 'self'; base-uri 'none'; "
            f"frame-ancestors {frame_ancestors}"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "strict-origin-when-cross-origin",
        "Cache-Control": "no-store",
    }


def error_text(lang: str, field: str, code: str, limits: Limits) -> str:
    key = _ERROR_KEYS.get((field, code), f"err_{code}")
    strings = STRINGS[lang]
    return strings.get(key, strings["err_required"]).format(**limits.words())


def render_form(
    *, lang: str, title: str, limits: Limits, form_url: str, values: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None, banner: str | None = None,
) -> str:
    """The form; ``errors`` maps a field to an error code and is shown next to that field."""
    strings = STRINGS[lang]
    values = values or {}
    errors = errors or {}
    subs: dict[str, str] = {
        "html_lang": strings["html_lang"],
        "title": escape(title),
        "css": CSS,
        "form_url": escape(form_url),
        "embed_url": escape(f"{form_url}/embed.js"),
        "contact_hint": escape(strings["contact_hint"]),
        "attachments_hint": escape(strings["attachments_hint"].format(**limits.words())),
        **{f"l_{key}": escape(strings[key]) for key in (*FIELDS, *_LABELS)},
    }
    for field in FIELDS:
        subs[f"v_{field}"] = escape(values.get(field, ""))
        code = errors.get(field)
        invalid = code is not None
        subs[f"{field}_class"] = " tg-invalid" if invalid else ""
        subs[f"{field}_invalid"] = ' aria-invalid="true"' if invalid else ""
        subs[f"{field}_described"] = f" tg-{field}-error" if invalid else ""
        subs[f"{field}_aria"] = f' aria-invalid="true" aria-describedby="tg-{field}-error"' if invalid else ""
        subs[f"{field}_error"] = (
            f'<p class="tg-error" id="tg-{field}-error">{escape(error_text(lang, field, code, limits))}</p>'
            if code is not None else ""
        )
    contact = errors.get("contact")
    subs["contact_error"] = (
        '<p class="tg-error" id="tg-contact-error" role="alert">'
        f"{escape(error_text(lang, 'contact', contact, limits))}</p>" if contact else ""
    )
    if contact:
        # Point both inputs at the shared error so screen readers announce it on either.
        for field in ("email", "phone"):
            if field not in errors:
                subs[f"{field}_described"] = " tg-contact-error"
                subs[f"{field}_invalid"] = ' aria-invalid="true"'
    banner_text = banner or (strings["error_summary"] if errors else None)
    subs["banner"] = f'<div class="tg-banner" role="alert">{escape(banner_text)}</div>' if banner_text else ""
    return _FORM.substitute(subs)


def render_page(
    *, lang: str, heading_key: str, body_key: str | None, form_url: str, page_id: str = "tg-page",
    details: Mapping[str, str] | None = None,
) -> str:
    """A short page: the thank-you page (``page_id="tg-thanks"``) or an error with a way back."""
    strings = STRINGS[lang]
    rows = "".join(
        f"<dt>{escape(strings.get(key, key))}</dt><dd><code>{escape(value)}</code></dd>"
        for key, value in (details or {}).items()
    )
    return _PAGE.substitute(
        html_lang=strings["html_lang"],
        css=CSS,
        page_id=page_id,
        heading=escape(strings[heading_key]),
        body=f'<p role="status">{escape(strings[body_key])}</p>' if body_key else "",
        details=f"<dl>{rows}</dl>" if rows else "",
        form_url=escape(form_url),
        link=escape(strings["again"]),
    )
