"""The daemon's logs: one JSON object per line (``log.format = "json"``) or plain lines for
people (``"text"``), a record's ``fields`` carried as keys of their own."""
from __future__ import annotations

import datetime
import json
import logging
import sys


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, a record's ``fields`` (``extra=fields(...)``) as keys of their own.

    >>> record = logging.makeLogRecord({"name": "forewarn.daemon", "levelname": "WARNING", "msg": "bad record",
    ...                                 "fields": {"reason": "not_json"}})
    >>> entry = json.loads(JsonFormatter().format(record))
    >>> sorted(entry), entry["message"], entry["reason"]
    (['level', 'logger', 'message', 'reason', 'time'], 'bad record', 'not_json')
    >>> record.created = 1700000000.25  # in UTC whatever the zone here, to the millisecond
    >>> json.loads(JsonFormatter().format(record))["time"]
    '2023-11-14T22:13:20.250Z'
    """

    def format(self, record: logging.LogRecord) -> str:
        # UTC, stated, to the millisecond: a collector reads a time without an offset as UTC,
        # which local time is not, and whole seconds cannot order a burst of lines
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """Plain log lines for people (``log.format = "text"``, the demo), ``fields`` appended as ``key=value``.

    >>> record = logging.makeLogRecord({"name": "forewarn.daemon", "levelname": "INFO", "msg": "%d partitions assigned",
    ...                                 "args": (2,), "fields": {"partitions": [0, 1]}})
    >>> TextFormatter().format(record).split(" ", 2)[2]  # after the date and time
    'INFO forewarn.daemon: 2 partitions assigned partitions=[0, 1]'
    >>> record.fields = {"device": "pump-7\\nERROR forged"}  # as it arrived in a message
    >>> TextFormatter().format(record).split(" ", 2)[2]
    "INFO forewarn.daemon: 2 partitions assigned device='pump-7\\\\nERROR forged'"
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # a field from the input (a device name) with a newline or an escape could forge a line
        extra = " ".join(f"{k}={v!r}" if isinstance(v, str) and not v.isprintable() else f"{k}={v}"
                         for k, v in getattr(record, "fields", {}).items())
        return super().format(record) + (f" {extra}" if extra else "")


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("forewarn")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def fields(**kwargs) -> dict:
    """``extra=`` for a log call: these keys as fields of their own in the line."""
    return {"fields": kwargs}
