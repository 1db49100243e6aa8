"""LOG_FORMAT=json: one JSON object a line, whatever the record holds."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

import pytest

from core_base.errors import SettingsError
from core_base.log_format import JsonLogFormatter, log_format_name, log_formatter
from core_base.settings import CoreSettings, LoggingSettings, load_settings


def record(
    message: str, *args: object, exc_info: Any = None, sinfo: str | None = None
) -> logging.LogRecord:
    return logging.LogRecord(
        "svc.part", logging.WARNING, __file__, 1, message, args, exc_info, sinfo=sinfo
    )


def test_a_record_is_one_line_of_json_with_its_fields() -> None:
    entry = record("task %s: %d tries, \u00e9t\u00e9 \u2713", "t-1", 3)
    entry.created = dt.datetime(2026, 12, 6, 7, 8, 9, 123456, tzinfo=dt.UTC).timestamp()
    line = JsonLogFormatter().format(entry)
    assert "\n" not in line
    assert json.loads(line) == {
        "time": "2026-12-06T07:08:09.123Z",
        "level": "WARNING",
        "logger": "svc.part",
        "message": "task t-1: 3 tries, \u00e9t\u00e9 \u2713",
    }


def test_a_traceback_and_a_stack_stay_inside_the_line() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        entry = record(
            "failed", exc_info=sys.exc_info(), sinfo="Stack (most recent call last):\n  here"
        )
    line = JsonLogFormatter().format(entry)
    assert "\n" not in line
    fields = json.loads(line)
    assert fields["message"] == "failed"
    assert fields["exception"].startswith("Traceback (most recent call last):")
    assert fields["exception"].endswith("ValueError: bad\nvalue")
    assert fields["stack"] == "Stack (most recent call last):\n  here"


def test_text_is_the_readable_line() -> None:
    entry = record("plain %s", "words")
    assert log_formatter("text").format(entry).endswith(" WARNING svc.part: plain words")
    assert isinstance(log_formatter("json"), JsonLogFormatter)


@pytest.mark.parametrize("value", ["json", "JSON", " Json "])
def test_log_format_takes_any_case(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    assert log_format_name(value) == "json"
    monkeypatch.setenv("LOG_FORMAT", value)
    assert load_settings(LoggingSettings).log_format == "json"


def test_an_unknown_log_format_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    for settings in (LoggingSettings, CoreSettings):
        with pytest.raises(SettingsError, match=r"^LOG_FORMAT: must be one of text, json"):
            load_settings(settings)
