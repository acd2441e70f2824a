"""What a worker's log lines look like: pretty on a terminal, JSON elsewhere, as the setting says."""

from __future__ import annotations

import io
import logging
import time

import pytest

from config.settings import Settings
from postroom import telemetry
from postroom.errors import ConfigurationError
from postroom.telemetry import (
    HANDLED,
    HandledOnly,
    JsonFormatter,
    PrettyFormatter,
    log_format_for,
    pool_colour,
)

CORRELATION_ID = "01a2097a-dcd8-73b6-88d0-e13bf13c7ffe"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def handled(owner: str, name: str, outcome: str) -> logging.LogRecord:
    """A record as the pipeline's Log step makes it (postroom/pipeline/steps.py)."""
    record = logging.LogRecord(
        HANDLED, logging.INFO, __file__, 1, "%s %s %s correlation_id=%s %.1fms",
        (owner, name, outcome, CORRELATION_ID, 3.14), None,
    )  # fmt: skip
    record.pool, record.outcome = owner, outcome
    return record


def clock(record: logging.LogRecord) -> str:
    return time.strftime("%H:%M:%S", time.localtime(record.created))


def test_a_handled_message_is_one_short_line_without_colours() -> None:
    record = handled("search", "assets.AssetRegistered@search", "handled")
    line = PrettyFormatter(colour=False).format(record)
    assert line == (
        f"{clock(record)} search        assets.AssetRegistered     handled   01a2…7ffe 3.1ms"
    )


def test_the_pool_colours_its_name_and_type_and_a_rejection_is_yellow() -> None:
    line = PrettyFormatter(colour=True).format(handled("assets", "assets.BindDevice", "rejected"))
    colour = pool_colour("assets")
    assert f"{colour}assets       " in line
    assert f"{colour}assets.BindDevice " in line
    assert f"{telemetry.YELLOW}rejected " in line
    assert line.endswith("01a2…7ffe 3.1ms")


def test_each_pool_of_the_deployment_has_its_own_colour_every_time() -> None:
    names = ["assets", "geofence", "search", "analytics", "notifications"]
    assert len({pool_colour(n) for n in names}) == len(names)
    assert pool_colour("search") == pool_colour("search")


def test_a_failure_is_red() -> None:
    line = PrettyFormatter(colour=True).format(handled("assets", "assets.RegisterAsset", "failed"))
    assert f"{telemetry.RED}failed " in line


def test_a_warning_from_anyone_keeps_its_logger_and_message() -> None:
    record = logging.LogRecord(
        "celery.worker.consumer", logging.WARNING, __file__, 1, "lost %s", ("the broker",), None
    )
    line = PrettyFormatter(colour=False).format(record)
    assert line == f"{clock(record)} WARNING  celery.worker.consumer: lost the broker"


def test_only_handled_lines_and_warnings_get_through_at_info() -> None:
    keep = HandledOnly()
    received = logging.LogRecord(
        "celery.worker.strategy", logging.INFO, __file__, 1, "Task x received", None, None
    )
    broken = logging.LogRecord("celery.app.trace", logging.ERROR, __file__, 1, "boom", None, None)
    assert keep.filter(handled("search", "assets.AssetRegistered@search", "handled"))
    assert not keep.filter(received)
    assert keep.filter(broken)


def test_auto_is_json_when_the_output_is_not_a_terminal() -> None:
    assert log_format_for("auto", io.StringIO()) == "json"
    assert log_format_for("", None) == "json"
    assert Settings.from_env({}).log_format == "auto"


def test_auto_is_pretty_on_a_terminal_and_an_explicit_setting_wins() -> None:
    assert log_format_for("auto", Terminal()) == "pretty"
    assert log_format_for("json", Terminal()) == "json"
    assert log_format_for("text", Terminal()) == "text"


def _formatted(setting: str, stream: io.StringIO) -> logging.Handler:
    """A handler as Celery's after_setup_logger hands it over, after postroom has formatted it."""
    logger = logging.Logger("celery-root-for-a-test")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    telemetry._format_handlers(setting)(logger=logger)
    return handler


def test_celerys_handler_on_a_terminal_is_pretty_and_keeps_only_handled_lines() -> None:
    handler = _formatted("auto", Terminal())
    assert isinstance(handler.formatter, PrettyFormatter)
    assert any(isinstance(f, HandledOnly) for f in handler.filters)


def test_celerys_handler_elsewhere_or_told_json_writes_json() -> None:
    assert isinstance(_formatted("auto", io.StringIO()).formatter, JsonFormatter)
    told = _formatted("json", Terminal())
    assert isinstance(told.formatter, JsonFormatter)
    assert not any(isinstance(f, HandledOnly) for f in told.filters)


def test_no_color_turns_the_colours_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert telemetry.use_colour(Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not telemetry.use_colour(Terminal())
    handler = _formatted("auto", Terminal())
    assert "\x1b[" not in handler.format(handled("search", "search.Reindex", "failed"))


def test_an_unknown_format_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigurationError, match="auto, json, pretty, text"):
        telemetry.configure(Settings.from_env({"POSTROOM_LOG_FORMAT": "fancy"}))
