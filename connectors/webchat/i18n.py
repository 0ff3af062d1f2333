"""The demo page's strings (the widget carries its own, in both languages, in widget.js)."""

from __future__ import annotations

from collections.abc import Mapping

STRINGS: Mapping[str, Mapping[str, str]] = {
    "en": {
        "html_lang": "en",
        "default_title": "Chat with us",
        "default_greeting": "Hello! Ask us anything; we usually answer within minutes.",
        "demo_heading": "Live chat demo",
        "demo_body": "The chat button in the corner opens the widget this page embeds. Messages go to "
        "the inbox {inbox}; a tick means the gateway has stored the message.",
        "demo_embed": "Embed it on your site:",
    },
    "zh": {
        "html_lang": "zh-CN",
        "default_title": "在线客服",
        "default_greeting": "您好！有什么可以帮您？我们通常几分钟内回复。",
        "demo_heading": "在线客服演示",
        "demo_body": "点击右下角的按钮打开本页嵌入的聊天窗口。消息会发送到收件箱 {inbox}；"
        "出现对勾表示网关已保存该消息。",
        "demo_embed": "在您的网站上嵌入：",
    },
}
