"""check-config's errors: all of them, with the line or the environment variable, and a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import load_settings

BAD = """[server]
port = 8080
max_conections = 10

[store]
backend = "sqlite"
min_free_disk_mb = "lots"
"""


def test_every_error_is_listed_with_its_line_and_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"TICKETGATE__SERVER__SHUTDOWN_TIMEOUT": "soon"})
    text = str(caught.value)
    assert "3 errors" in text
    assert "more error" not in text
    assert f"{path}:3: key 'server.max_conections'" in text
    assert "did you mean 'max_connections'?" in text
    assert f"{path}:7: key 'store.min_free_disk_mb'" in text
    # The bad value came from the environment: the variable is named, not the file.
    assert "environment variable TICKETGATE__SERVER__SHUTDOWN_TIMEOUT: key 'server.shutdown_timeout'" in text
    assert f"{path}: key 'server.shutdown_timeout'" not in text
