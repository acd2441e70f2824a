"""Settings: one object, POSTROOM_* variables, documented defaults, no secret in its repr."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.settings import Settings, documented
from postroom.errors import ConfigurationError

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_work_on_this_machine() -> None:
    s = Settings.from_env({})
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.state == s.result_backend
    assert s.task_sent_events is True


def test_variables_override_defaults_with_their_types() -> None:
    s = Settings.from_env({"POSTROOM_MAX_RETRIES": "7", "POSTROOM_RETRY_BACKOFF": "0.5"})
    assert (s.max_retries, s.retry_backoff) == (7, 0.5)


@pytest.mark.parametrize("written", ["false", "False", "0", "no", "off"])
def test_a_boolean_false_reads_as_false(written: str) -> None:
    assert Settings.from_env({"POSTROOM_TASK_SENT_EVENTS": written}).task_sent_events is False


@pytest.mark.parametrize("written", ["true", "1", "yes", "on"])
def test_a_boolean_true_reads_as_true(written: str) -> None:
    assert Settings.from_env({"POSTROOM_TASK_SENT_EVENTS": written}).task_sent_events is True


def test_variable_names_are_case_insensitive() -> None:
    assert Settings.from_env({"postroom_max_retries": "2"}).max_retries == 2


def test_unknown_postroom_variables_are_ignored() -> None:
    assert Settings.from_env({"POSTROOM_NO_SUCH_SETTING": "x"}) == Settings.from_env({})


def test_the_given_mapping_is_read_instead_of_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTROOM_MAX_RETRIES", "9")
    assert Settings().max_retries == 9
    assert Settings.from_env({}).max_retries == 5


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="POSTROOM_FLOWER_PORT='http' is not a valid int"):
        Settings.from_env({"POSTROOM_FLOWER_PORT": "http"})


def test_a_bad_boolean_names_the_variable_and_what_it_means() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"POSTROOM_TASK_SENT_EVENTS": "maybe"})
    message = str(raised.value)
    assert "POSTROOM_TASK_SENT_EVENTS='maybe' is not a valid bool" in message
    assert "true/false" in message
    assert "task-sent event" in message  # what the setting means


def test_a_visibility_timeout_of_zero_is_refused_with_what_it_means() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"POSTROOM_VISIBILITY_TIMEOUT": "0"})
    message = str(raised.value)
    assert "POSTROOM_VISIBILITY_TIMEOUT='0' must be greater than 0" in message
    assert "heartbeat" in message


def test_queues_are_quorum_unless_classic_is_chosen_and_redis_has_no_types() -> None:
    rabbitmq = {"POSTROOM_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"}
    assert Settings.from_env(rabbitmq).declared_queue_type == "quorum"
    classic = {**rabbitmq, "POSTROOM_QUEUE_TYPE": "classic"}
    assert Settings.from_env(classic).declared_queue_type == "classic"
    assert Settings.from_env({}).declared_queue_type == "classic"  # Redis


def test_an_unknown_queue_type_is_refused_with_the_types_there_are() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"POSTROOM_QUEUE_TYPE": "mirrored"})
    message = str(raised.value)
    assert "POSTROOM_QUEUE_TYPE='mirrored' must be 'quorum' or 'classic'" in message
    assert "cannot change type in place" in message


def test_every_bad_value_is_named_at_once() -> None:
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env({"POSTROOM_FLOWER_PORT": "http", "POSTROOM_RETRY_BACKOFF": "soon"})
    assert "POSTROOM_FLOWER_PORT='http'" in str(raised.value)
    assert "POSTROOM_RETRY_BACKOFF='soon'" in str(raised.value)


def test_settings_cannot_be_changed_once_read() -> None:
    s = Settings.from_env({})
    with pytest.raises(ValueError, match="frozen"):
        s.max_retries = 1  # type: ignore[misc]


def test_passwords_never_appear_in_the_repr() -> None:
    s = Settings.from_env({
        "POSTROOM_BROKER_URL": "amqp://guest:s3cret@127.0.0.1:5672//",
        "POSTROOM_FLOWER_BASIC_AUTH": "admin:hunter2",
        "POSTROOM_SIGNING_KEYS": "k3y-one,k3y-two",
    })  # fmt: skip
    for shown in (repr(s), str(s)):
        assert "s3cret" not in shown
        assert "hunter2" not in shown
        assert "k3y" not in shown
    assert "<2 key(s)>" in repr(s)


def test_every_variable_is_documented_in_the_readme_with_its_default() -> None:
    text = README.read_text()
    for variable, default, meaning in documented():
        row = re.search(rf"^\| `{variable}` \| (.*?) \| (.*) \|$", text, re.MULTILINE)
        assert row, f"{variable} is missing from the README's settings table"
        assert default in row.group(1) or (default == "" and "unset" in row.group(1)), variable
        assert row.group(2) == meaning, variable
