"""The form's strings in English and Chinese, and the choice between them from Accept-Language."""

from __future__ import annotations

from collections.abc import Mapping

LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"

STRINGS: Mapping[str, Mapping[str, str]] = {
    "en": {
        "html_lang": "en",
        "default_title": "Contact us",
        "name": "Name",
        "email": "Email",
        "phone": "Phone",
        "subject": "Subject",
        "message": "Message",
        "attachments": "Attachments",
        "optional": "optional",
        "required": "required",
        "contact_hint": "Give an email address or a phone number so we can reply.",
        "attachments_hint": "Up to {count} files, {size} each, {total} in total.",
        "submit": "Send",
        "honeypot": "Leave this field empty",
        "error_summary": "Please correct the fields marked below.",
        "err_required": "Please fill in this field.",
        "err_invalid_email": "Please enter a valid email address.",
        "err_invalid_phone": "Please enter a valid phone number, or give an email address.",
        "err_too_long": "This is too long.",
        "err_contact_required": "Please give an email address or a phone number.",
        "err_too_many": "Too many files: at most {count}.",
        "err_too_large": "The files are too large: at most {size} each and {total} in total.",
        "thanks_title": "Thank you",
        "thanks_body": "We received your message and will reply as soon as we can.",
        "reference": "Reference",
        "again": "Send another message",
        "rate_limited": "Too many messages from your network. Please try again in a minute.",
        "forbidden": "This form cannot be sent from this page.",
        "unavailable": "We could not save your message just now. Please send it again in a moment; "
        "your text is still in the form.",
        "rejected": "We could not accept this message.",
        "too_large": "The message and its files are too large to send.",
        "unsupported": "This form only accepts form submissions.",
        "not_found": "There is no such form.",
    },
    "zh": {
        "html_lang": "zh-CN",
        "default_title": "联系我们",
        "name": "姓名",
        "email": "电子邮箱",
        "phone": "电话",
        "subject": "主题",
        "message": "留言内容",
        "attachments": "附件",
        "optional": "选填",
        "required": "必填",
        "contact_hint": "请留下电子邮箱或电话，方便我们回复您。",
        "attachments_hint": "最多 {count} 个文件，单个不超过 {size}，合计不超过 {total}。",
        "submit": "提交",
        "honeypot": "此项请留空",
        "error_summary": "请更正下方标出的内容。",
        "err_required": "请填写此项。",
        "err_invalid_email": "请输入有效的电子邮箱地址。",
        "err_invalid_phone": "请输入有效的电话号码，或留下电子邮箱。",
        "err_too_long": "内容过长。",
        "err_contact_required": "请至少填写电子邮箱或电话中的一项。",
        "err_too_many": "文件过多：最多 {count} 个。",
        "err_too_large": "文件过大：单个不超过 {size}，合计不超过 {total}。",
        "thanks_title": "谢谢",
        "thanks_body": "我们已收到您的留言，会尽快回复您。",
        "reference": "编号",
        "again": "再发一条留言",
        "rate_limited": "您所在网络的提交过于频繁，请一分钟后再试。",
        "forbidden": "无法从此页面提交该表单。",
        "unavailable": "暂时无法保存您的留言，请稍后重新提交；您填写的内容仍保留在表单中。",
        "rejected": "无法接受这条留言。",
        "too_large": "留言及附件过大，无法提交。",
        "unsupported": "此表单只接受表单提交。",
        "not_found": "找不到该表单。",
    },
}


def pick_language(accept_language: str | None, override: str | None = None) -> str:
    """``zh`` when the browser ranks any Chinese above English (``zh``, ``zh-CN``, ``zh-Hant``), else ``en``.

    ``override`` (the page's ``?lang=``) wins when it names a language we have.
    """
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


def human_size(size: int) -> str:
    """``10 MB`` style sizes for hints (binary units, which is what file pickers show)."""
    if size < 1024:
        return f"{size} bytes"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} GB"
