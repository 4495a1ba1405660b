"""The log formats of the `overnight` commands (device_runtime/logs.py)."""

from __future__ import annotations

import json
import logging
import sys

from device_runtime.logs import JsonLogFormatter, TextLogFormatter, about, log_context

DEVICE = "9f" * 32


def _record(level: int, message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("server.test", level, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_fields_of_what_it_is_about() -> None:
    record = _record(logging.WARNING, "round failed", **about("t1", 7))

    line = json.loads(JsonLogFormatter().format(record))

    assert line["level"] == "WARNING"
    assert line["logger"] == "server.test"
    assert line["message"] == "round failed"
    assert (line["task"], line["round"]) == ("t1", 7)
    assert "device" not in line


def test_the_device_is_dropped_at_info_and_kept_at_debug() -> None:
    formatter = JsonLogFormatter()

    at_info = json.loads(formatter.format(_record(logging.INFO, "m", **about(device=DEVICE))))
    at_debug = json.loads(formatter.format(_record(logging.DEBUG, "m", **about(device=DEVICE))))

    assert "device" not in at_info
    assert at_debug["device"] == DEVICE


def test_text_shows_the_device_only_at_debug() -> None:
    formatter = TextLogFormatter()

    at_info = formatter.format(_record(logging.INFO, "assigned", **about(device=DEVICE)))
    at_debug = formatter.format(_record(logging.DEBUG, "assigned", **about(device=DEVICE)))

    assert DEVICE not in at_info
    assert at_debug.endswith(f"assigned [device {DEVICE}]")


def test_a_context_adds_its_fields_and_a_call_overrides_them() -> None:
    with log_context("t1", 3):
        inherited = json.loads(JsonLogFormatter().format(_record(logging.INFO, "m")))
        overridden = json.loads(
            JsonLogFormatter().format(_record(logging.INFO, "m", **about(round_number=4)))
        )
    after = json.loads(JsonLogFormatter().format(_record(logging.INFO, "m")))

    assert (inherited["task"], inherited["round"]) == ("t1", 3)
    assert (overridden["task"], overridden["round"]) == ("t1", 4)
    assert "task" not in after


def test_a_traceback_stays_inside_its_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "server.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )

    text = JsonLogFormatter().format(record)

    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exception"]
