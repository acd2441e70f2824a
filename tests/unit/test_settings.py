"""Settings: one object, POSTROOM_* variables, documented defaults, no secret in its repr."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.settings import Settings, documented

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_work_on_this_machine() -> None:
    s = Settings.from_env({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.state == s.result_backend


def test_variables_override_defaults_with_their_types() -> None:
    s = Settings.from_env({"POSTROOM_MAX_RETRIES": "7", "POSTROOM_RETRY_BACKOFF": "0.5"})
    assert (s.max_retries, s.retry_backoff) == (7, 0.5)


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="POSTROOM_FLOWER_PORT='http' is not a valid int"):
        Settings.from_env({"POSTROOM_FLOWER_PORT": "http"})


def test_passwords_never_appear_in_the_repr() -> None:
    s = Settings.from_env({
        "POSTROOM_BROKER_URL": "amqp://guest:s3cret@127.0.0.1:5672//",
        "POSTROOM_FLOWER_BASIC_AUTH": "admin:hunter2",
    })  # fmt: skip
    assert "s3cret" not in repr(s)
    assert "hunter2" not in repr(s)


def test_every_variable_is_documented_in_the_readme_with_its_default() -> None:
    text = README.read_text()
    for variable, default, _ in documented():
        row = re.search(rf"^\| `{variable}` \| (.*?) \|", text, re.MULTILINE)
        assert row, f"{variable} is missing from the README's settings table"
        assert default in row.group(1) or (default == "" and "unset" in row.group(1)), variable
