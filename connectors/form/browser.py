"""What an end-to-end browser test needs to drive the form: its URL, stable selectors, sample input.

The form needs no JavaScript: a browser fills the inputs and submits a plain multipart POST to the
same URL; the answer is the thank-you page (``#tg-thanks``) or the form again with errors
(``#tg-<field>-error``).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from connectors.form.connector import PREFIX

SUBMIT = "#tg-submit"
THANKS = "#tg-thanks"
HONEYPOT = "#tg-website"


def form_url(base_url: str, inbox: str, *, lang: str | None = None) -> str:
    """``{base_url}/forms/{inbox}`` (``?lang=zh`` to force Chinese labels)."""
    url = f"{base_url.rstrip('/')}{PREFIX}/{quote(inbox, safe='')}"
    return f"{url}?lang={lang}" if lang else url


def error_selector(field: str) -> str:
    return f"#tg-{field}-error"


def sample_input(marker: str = "browser") -> Mapping[str, str]:
    """CSS selector -> text to type; ``marker`` makes the message unique so it is not a duplicate."""
    return {
        "#tg-name": "王小明",
        "#tg-email": "xiaoming@example.com",
        "#tg-phone": "138 0013 8000",
        "#tg-subject": "退款申请",
        "#tg-message": f"订单号 123456789012345678 收到时已破损，请退款。({marker})",
    }
