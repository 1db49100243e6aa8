"""How log lines are written: ``LOG_FORMAT=text`` (a line for people reading a
terminal) or ``json`` (one JSON object a line, for collectors that index fields:
Loki, Elasticsearch, CloudWatch), where a traceback stays inside its line instead
of spreading over many that a line-based collector splits apart."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import TextIO

LOG_FORMATS = ("text", "json")
_TEXT_LINE = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_format_name(value: str) -> str:
    """A log format's name, any case (``ValueError`` for another)."""
    name = value.strip().lower()
    if name not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return name


def log_formatter(name: str) -> logging.Formatter:
    """The formatter of the log format ``name`` (see :data:`LOG_FORMATS`)."""
    return JsonLogFormatter() if name == "json" else logging.Formatter(_TEXT_LINE)


class JsonLogFormatter(logging.Formatter):
    """``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``,
    and ``exception`` / ``stack`` when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def say(line: str, *, level: int = logging.ERROR, stream: TextIO | None = None) -> None:
    """A line for whoever runs a command (an error, what it did): printed on
    ``stream`` (stderr by default), or, where every line must be JSON (the root
    logger writes JSON records), a log record of ``level``."""
    if any(isinstance(h.formatter, JsonLogFormatter) for h in logging.getLogger().handlers):
        logging.getLogger("audiocraft_service").log(level, line)
    else:
        print(line, file=stream if stream is not None else sys.stderr)
