"""Command-line tools the tests run for real (swaks, dovecot, promtool ...)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.rabbitmq import ALLOW_SKIP_ENV


def require_tool(path_or_name: str, package: str) -> str:
    """The tool's path; fails loudly when missing (skips only with TICKETGATE_TEST_ALLOW_SKIP=1)."""
    found = shutil.which(path_or_name) or (path_or_name if os.path.exists(path_or_name) else None)
    if found is not None:
        return found
    message = (
        f"{path_or_name} is not installed (Debian package {package}; scripts/ensure-services.sh installs it)"
    )
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} (set {ALLOW_SKIP_ENV}=1 to skip instead)", pytrace=False)
