"""How the `overnight` commands write their logs (here, in the base install every command
has, so that the coordinator's modules and the device's share it without importing the
command package): human-readable text (the default), or one
JSON object per line (`overnight serve --log-format json`) for a log pipeline.

A JSON line has `time` (UTC, ISO 8601), `level`, `logger` and `message`, `exception` when a
traceback goes with it, and the fields of what it is about where they apply: `task`, `round`
and `device`. A log call passes them with `extra=about(...)`; code that works for one task
throughout (the round driver) sets them once with `log_context(...)`.

A device id is personal data of the device's owner, so it is written only at DEBUG: the
formatters drop the `device` field from records at INFO and above, and messages never carry
a device id in their text (tests/test_logs.py checks a whole round at INFO).

Standard library only (`logging`, `json`): the base install, the device runtime, uses it too,
and a formatter of a few lines does not justify a dependency there.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
import types
from collections.abc import Iterator, Mapping

TEXT, JSON = "text", "json"
LOG_FORMATS = (TEXT, JSON)
FIELDS = ("task", "round", "device")
_DEVICE = "device"

_context: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "overnight_log_context", default=types.MappingProxyType({})
)


def about(
    task: str | None = None, round_number: int | None = None, device: str | None = None
) -> dict[str, object]:
    """The `extra=` of a log call about a task, a round or a device."""
    fields = {"task": task, "round": round_number, _DEVICE: device}
    return {name: value for name, value in fields.items() if value is not None}


@contextlib.contextmanager
def log_context(
    task: str | None = None, round_number: int | None = None, device: str | None = None
) -> Iterator[None]:
    """Every record logged in this block (this thread or asyncio task) is about these."""
    token = _context.set({**_context.get(), **about(task, round_number, device)})
    try:
        yield
    finally:
        _context.reset(token)


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """What `record` is about: the context's fields, overridden by the call's own; without
    the device below DEBUG's level."""
    fields = dict(_context.get())
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    if record.levelno >= logging.INFO:
        fields.pop(_DEVICE, None)
    return fields


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        line: dict[str, object] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **record_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a field of an unexpected type (a Path, an enum) still makes a line.
        return json.dumps(line, default=str, ensure_ascii=False)


class TextLogFormatter(logging.Formatter):
    """`time LEVEL logger: message`, and the device at DEBUG (the message names the task and
    round already)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        device = record_fields(record).get(_DEVICE)
        return text if device is None else f"{text} [device {device}]"


def formatter(log_format: str) -> logging.Formatter:
    if log_format == JSON:
        return JsonLogFormatter()
    if log_format == TEXT:
        return TextLogFormatter()
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


def configure(level: int, log_format: str = TEXT) -> None:
    """Logs of `level` and above go to stderr in `log_format`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])


def use_format(log_format: str) -> None:
    """Switches the handlers `configure` installed to `log_format` (a command's own
    --log-format, known once its arguments are parsed)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter(log_format))


def status_logger(name: str, log_format: str) -> logging.Logger:
    """A command's progress lines ("listening on ...") on stdout, whatever the log level:
    the bare message as text, a JSON line (level INFO) as JSON."""
    status = logging.getLogger(name)
    status.setLevel(logging.INFO)
    status.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    bare = logging.Formatter("%(message)s")
    handler.setFormatter(bare if log_format == TEXT else formatter(JSON))
    status.handlers[:] = [handler]
    return status
