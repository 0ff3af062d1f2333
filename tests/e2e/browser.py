"""Debian's chromium under Playwright (no browser download: executable_path points at the system one)."""

from __future__ import annotations

import shutil

from playwright.async_api import Browser, Playwright

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def launch_chromium(pw: Playwright) -> Browser:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Debian's chromium is not installed (scripts/ensure-services.sh chromium)")
    return await pw.chromium.launch(executable_path=path, headless=True, args=FLAGS)
