"""Recorded data in and scores out: the file side of replay and evaluation.

Formats (``--format``):

``nab``   CSV ``timestamp,value``: one device, named after the file.
``wide``  CSV with an optional ``timestamp`` column, every other column a channel
          of one device; a headerless numeric CSV (SMD) works too, channels
          ``c0..cN`` and row numbers as timestamps.
``jsonl`` one reading message per line (the Kafka message format).

``.gz`` files are read directly.  Rows that cannot be used become ``BadRecord``s
naming their line; a file that cannot be read at all raises ``FileFormatError``.
"""
from __future__ import annotations

import csv
import datetime
import gzip
import io
import json
import math
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import numpy as np

from monitor.readings import (BadReason, BadRecord, MessageFormat, Reading, Score, by_reason, check_value,
                              encodes_as_utf8, parse_message, parse_timestamp)

FORMATS = ("nab", "wide", "jsonl")
_BLANK = " \t\r\n"  # what a blank line holds; other white space is a record, and a bad one
_TIMESTAMP_COLUMNS = ("timestamp", "ts", "time", "datetime", "date")
# what a directory given as data holds that is a recording (NAB's label .json files are not)
DATA_SUFFIXES = (".csv", ".txt", ".jsonl", ".ndjson")


class FileFormatError(ValueError):
    """A recorded file that cannot be read; the message names the file and line.

    A bad row only becomes a ``BadRecord``; a bad header leaves nothing to read:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +ELLIPSIS
    ...     path = Path(tmp, "pump.csv")
    ...     _ = path.write_text("timestamp,temp,temp\\n2024-01-01 00:00:00,71.2,71.3\\n")
    ...     read_series(path)
    Traceback (most recent call last):
        ...
    connectors.files.FileFormatError: .../pump.csv: line 1: channel names must be non-empty and unique, got ...
    """


@dataclass
class Batch:
    """Readings from consecutive records, plus the records that were rejected.

    >>> batch = Batch([Reading("pump-7", 1700000000.0, {"temp": 71.2}, "line 2")],
    ...               [BadRecord(BadReason.MISSING_TIMESTAMP, "empty timestamp cell", "line 3")])
    >>> len(batch.readings) + len(batch.bad)  # what FileSource's batch_size counts: rejects fill a batch too
    2
    >>> [str(b) for b in batch.bad]
    ['line 3: missing_timestamp: empty timestamp cell']
    """

    readings: list[Reading] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    raw: dict[str, str] = field(default_factory=dict)  # each reading's record, by its ref

    def with_raw(self, bad: list[BadRecord]) -> list[BadRecord]:
        """``bad`` with the record each came from where it lacks it: the pipeline's rejections
        (a duplicate timestamp, say) name only their reading's line.

        >>> batch = Batch([Reading("pump-7", 5.0, {"temp": 71.2}, "line 2")], raw={"line 2": "5,71.2"})
        >>> late = BadRecord(BadReason.DUPLICATE_TIMESTAMP, "ts 5 after 5", "line 2")
        >>> [b.raw for b in batch.with_raw([late])]
        ['5,71.2']
        """
        return [b if b.raw is not None or b.ref not in self.raw else replace(b, raw=self.raw[b.ref]) for b in bad]


def device_name(path: str | Path) -> str:
    """The device a single-device file describes: its name without extensions.

    >>> device_name("data/machine-1-2.txt.gz")
    'machine-1-2'
    """
    name = Path(path).name
    for suffix in (".gz", ".csv", ".txt", ".jsonl", ".ndjson", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def open_text(path: str | Path, newline: str = "") -> IO[str]:
    """A recording as text; ``newline=""`` splits lines at CR, LF and CRLF, as CSV files
    written anywhere end them, ``"\\n"`` at LF alone (JSON Lines: a CR there is white space)."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    if path.is_dir():
        raise FileFormatError(f"{path}: is a directory, not a recording")
    # utf-8-sig: a byte-order mark would otherwise become part of the first column's name.
    # surrogateescape: bytes that are not UTF-8 stay recognisable (encodes_as_utf8), so the record
    # holding them is refused; replacing them would make Latin-1 "pump-ä" and "pump-ö" one device
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors="surrogateescape",
                                newline=newline)
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _not_utf8(text: str, ref: str) -> BadRecord:
    return BadRecord(BadReason.MALFORMED, "not valid UTF-8", ref, _as_bytes_escaped(text)[:500])


def _as_bytes_escaped(text: str) -> str:
    """A line with bytes that are not UTF-8 as printable text: ``pump-\\xe4``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def detect_format(path: str | Path) -> str:
    """Guess the format from the name and the first line."""
    name = Path(path).name.removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():
        shown = "- (standard input)" if str(path) == "/dev/stdin" else path
        raise FileFormatError(f"{shown}: not a regular file (a pipe?): give its format, since guessing it "
                              "would read lines the replay then misses")
    with open_text(path) as f:
        try:
            first = next((line.strip().lower() for line in f if line.strip(_BLANK)), "")
        except (EOFError, zlib.error) as exc:  # a cut or damaged .gz
            raise FileFormatError(f"{path}: truncated or corrupt compressed data ({exc})") from None
        except OSError as exc:
            raise FileFormatError(f"{path}: unreadable ({exc})") from None
    if first.startswith("{"):
        return "jsonl"
    if first.replace(" ", "") == "timestamp,value":
        return "nab"
    return "wide"


class FileSource:
    """Iterate a recorded file as batches of readings.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "pump.csv")
    >>> _ = open(path, "w").write("timestamp,value\\n2024-01-01 00:00:00,1.5\\n2024-01-01 00:05:00,oops\\n")
    >>> batch, = FileSource(path).batches()
    >>> [r.values for r in batch.readings], [str(b) for b in batch.bad]
    ([{'value': 1.5}], ["line 3: non_numeric_value: device 'pump' channel 'value': 'oops' is not a number"])
    """

    def __init__(self, path: str | Path, fmt: str | None = None, batch_size: int = 1000,
                 message_format: MessageFormat = MessageFormat(), device: str | None = None) -> None:
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.path = Path(path)
        self.format = fmt or detect_format(path)
        self.batch_size = batch_size
        self.message_format = message_format
        self.device = device or device_name(path)
        if self.format != "jsonl":  # the file's one device: its name is checked as a message's would be
            name = self.device
            if not name or len(name) > message_format.max_name_length or not encodes_as_utf8(name):
                raise FileFormatError(f"{self.path}: its name gives the device name {name[:40]!r}, which is empty, "
                                      f"longer than {message_format.max_name_length} characters or not valid "
                                      "UTF-8; rename the file")

    def batches(self) -> Iterator[Batch]:
        records = {"nab": self._csv_records, "wide": self._csv_records, "jsonl": self._jsonl_records}[self.format]
        batch = Batch()
        n = 0
        error = None
        try:
            for reading, bad, raw in records():
                n += 1
                if reading is not None:
                    batch.readings.append(reading)
                    batch.raw[reading.ref] = raw
                batch.bad.extend(bad)
                if len(batch.readings) + len(batch.bad) >= self.batch_size:
                    yield batch
                    batch = Batch()
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a cut or damaged .gz
            error = FileFormatError(f"{self.path}: truncated or corrupt compressed data after {n:,} records "
                                    f"({exc})")
        # the records read before a damaged part are as good as any: they are scored before the error
        if batch.readings or batch.bad:
            yield batch
        if error is not None:
            raise error

    def readings(self) -> Iterator[Reading]:
        for batch in self.batches():
            yield from batch.readings

    # ---- jsonl -------------------------------------------------------------
    def _jsonl_records(self) -> Iterator[tuple[Reading | None, list[BadRecord], str]]:
        # lines end at LF alone: a lone CR is JSON's white space, and splitting there would
        # make one good message two malformed ones
        with open_text(self.path, newline="\n") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip(_BLANK):  # other white space (a form feed, U+2028) is a bad record
                    continue
                line = line.rstrip("\r\n")
                if not encodes_as_utf8(line):
                    yield None, [_not_utf8(line, f"line {number}")], line
                    continue
                parsed = parse_message(line, self.message_format, ref=f"line {number}")
                yield parsed.reading, parsed.bad, line[:500]

    # ---- csv (nab and wide) -----------------------------------------------------
    def _csv_records(self) -> Iterator[tuple[Reading | None, list[BadRecord], str]]:
        max_abs = self.message_format.max_abs_value
        with open_text(self.path) as f:
            lines = _Lines(f)
            rows = csv.reader(lines)
            first: list[str] | None = []
            while first is not None and _blank(first):  # blank lines before the header
                lines.start_row()
                try:
                    first = next(rows, None)
                except csv.Error as exc:
                    raise FileFormatError(f"{self.path}: line {lines.row_start}: not CSV ({exc})") from None
            if first is None:
                raise FileFormatError(f"{self.path}: empty file, expected a CSV header or data")
            first_line = lines.row_start
            at = f"line {first_line}"
            if lines.hit_end and not lines.spanned:
                raise FileFormatError(f"{self.path}: {at}: a quoted cell is left open at the end of the file")
            if lines.spanned:  # a quote left open would swallow the lines after it into one name
                raise FileFormatError(f"{self.path}: {at}: a quoted cell runs over the lines after it (a quote "
                                      "left open, or a line break in a name)")
            joined = ",".join(first)
            if not encodes_as_utf8(joined):  # channel names, or the first row of a headerless file: neither is guessed
                raise FileFormatError(f"{self.path}: {at}: not valid UTF-8: '{_as_bytes_escaped(joined)[:80]}'")
            first_text = lines.text
            header, ts_col, pending = self._header(first, at)
            width = len(header) + (ts_col is not None)
            row_number = -1  # a headerless file's timestamps: every non-blank row after the header takes one
            dates_checked = False
            stream = rows if pending is None else _chain([pending], rows)
            while True:
                lines.start_row()
                try:
                    row = next(stream)
                except StopIteration:
                    break
                except csv.Error as exc:
                    row_number += 1
                    line, raw = lines.reject_row()  # the lines after its first are read again
                    yield None, [BadRecord(BadReason.MALFORMED, f"not CSV ({exc})", f"line {line}", raw)], raw
                    continue
                line = lines.row_start or first_line  # none read: the first row, read before, was data
                if lines.hit_end or (lines.spanned and (len(row) != width or any(map(_swallowed, row)))):
                    # a quote left open swallows the lines after it as one cell (csv.reader ends it
                    # quietly at the end of the file): only the line it is on is bad, and the next
                    # one is read again as a row of its own. A value written over lines stays one
                    row_number += 1
                    detail = "a quoted cell left open " + ("runs over the lines after it" if lines.spanned
                                                           else "at the end of the file")
                    line, raw = lines.reject_row()
                    yield None, [BadRecord(BadReason.MALFORMED, detail, f"line {line}", raw)], raw
                    continue
                raw = lines.text if lines.row_start else first_text  # as written: quotes and all
                if _blank(row) and not raw.strip(_BLANK):  # `""` is an empty cell, not a blank line
                    continue
                row_number += 1
                ref = f"line {line}"
                if not encodes_as_utf8(raw):
                    yield None, [_not_utf8(raw, ref)], raw
                    continue
                raw = raw[:500]
                if len(row) != width:
                    yield None, [BadRecord(BadReason.MALFORMED, f"expected {width} fields, got {len(row)}", ref, raw)], raw
                    continue
                if ts_col is None:
                    ts = float(row_number)
                else:
                    cell = _number_or_text(row[ts_col])
                    if cell is None:
                        yield None, [BadRecord(BadReason.MISSING_TIMESTAMP, "empty timestamp cell", ref, raw)], raw
                        continue
                    if not dates_checked:  # the first timestamp tells what the column holds
                        dates_checked = True
                        day = _basic_date(row[ts_col])
                        if day is not None:
                            raise FileFormatError(
                                f"{self.path}: {ref}: the timestamp {row[ts_col].strip()} looks like the date {day} "
                                "written YYYYMMDD, which as epoch seconds would be August 1970: write the "
                                f"column's dates as {day}, or its times as epoch seconds")
                    try:
                        ts = parse_timestamp(cell)
                    except ValueError as exc:
                        yield None, [BadRecord(BadReason.BAD_TIMESTAMP, str(exc), ref, raw)], raw
                        continue
                values: dict[str, float] = {}
                rejected: list[tuple[BadReason, str, str]] = []
                fields = (v for i, v in enumerate(row) if i != ts_col)
                for channel, text in zip(header, fields):
                    value, reason, detail = check_value(_number_or_text(text), max_abs)
                    if reason is None:
                        values[channel] = value
                    else:
                        if reason is BadReason.NON_NUMERIC_VALUE:
                            detail = f"{text.strip()[:40]!r} is not a number"
                        rejected.append((reason, channel, detail))
                bad = by_reason(self.device, rejected, ref, raw) if rejected else []
                yield (Reading(self.device, ts, values, ref) if values else None), bad, raw

    def _header(self, first: list[str], at: str) -> tuple[list[str], int | None, list[str] | None]:
        """Channel names, the timestamp column, and the first row if it was data (``at``: its line)."""
        cells = [c.strip() for c in first]
        if self.format == "nab":
            if [c.lower() for c in cells] != ["timestamp", "value"]:
                raise FileFormatError(f"{self.path}: {at}: a nab file starts with 'timestamp,value', got {','.join(cells)[:80]!r}")
            return ["value"], 0, None
        kinds = [_number_or_text(c) for c in cells]
        numbers = [c for c, k in zip(cells, kinds) if isinstance(k, float)]
        texts = [c for c, k in zip(cells, kinds) if isinstance(k, str)]
        if numbers and not texts:  # empty cells are missing values of a data row (a header has no empty names)
            return [f"c{i}" for i in range(len(cells))], None, first
        if numbers:  # a data row with a bad cell, or a header with numbers: either way, a guess
            raise FileFormatError(
                f"{self.path}: {at}: neither a header (it holds numbers: {numbers[:3]}) nor a data row "
                f"(it holds {texts[:3]}); a headerless file starts with numbers only")
        lowered = [c.lower() for c in cells]
        named_time = [c for c in cells if c.lower() in _TIMESTAMP_COLUMNS]
        if len(named_time) > 1:  # which one is the time, and is the other a channel? not a guess to make
            raise FileFormatError(f"{self.path}: {at}: columns {', '.join(map(repr, named_time))} each name a "
                                  "time; keep one timestamp column (join a date and a time into one)")
        ts_col = next((lowered.index(n) for n in _TIMESTAMP_COLUMNS if n in lowered), None)
        channels = [c for i, c in enumerate(cells) if i != ts_col]
        if not channels or any(not c for c in channels) or len(set(channels)) != len(channels):
            raise FileFormatError(f"{self.path}: {at}: channel names must be non-empty and unique, got {','.join(cells)[:80]!r}")
        longest = max(channels, key=len)
        if len(longest) > self.message_format.max_name_length:  # as a message's channel names are
            raise FileFormatError(f"{self.path}: {at}: channel name of {len(longest)} characters, more than "
                                  f"{self.message_format.max_name_length}: {longest[:40]!r}...")
        return channels, ts_col, None


class _Lines:
    """The file's lines as ``csv.reader`` takes them, numbered, with the lines of the current
    row kept so that a bad multi-line row can give back all but its first."""

    def __init__(self, f) -> None:
        self._lines = iter(f)
        self._number = 0
        self._again: list[tuple[int, str]] = []   # given back, next first (a stack: last is next)
        self._row: list[tuple[int, str]] = []     # the lines of the row being read
        # the file ended inside the row: only a quoted cell left open reads past its last line,
        # and csv.reader (not strict, which would refuse `"2" ` as well) ends it without a word
        self.hit_end = False

    def __iter__(self) -> "_Lines":
        return self

    def __next__(self) -> str:
        if self._again:
            number, line = self._again.pop()
        else:
            try:
                line = next(self._lines)
            except StopIteration:
                self.hit_end = True
                raise
            self._number += 1
            number = self._number
        self._row.append((number, line))
        return line

    def start_row(self) -> None:
        self._row = []
        self.hit_end = False

    @property
    def row_start(self) -> int | None:
        return self._row[0][0] if self._row else None

    @property
    def spanned(self) -> bool:
        return len(self._row) > 1

    @property
    def text(self) -> str:
        """The row's lines as written, for its dead letter."""
        return "".join(line for _, line in self._row).rstrip("\r\n")

    def reject_row(self) -> tuple[int, str]:
        """Give back the row's lines after its first; the first's number and text (500 characters)."""
        if not self._row:
            return self._number, ""
        self._again.extend(reversed(self._row[1:]))
        number, line = self._row[0]
        self._row = []
        self.hit_end = False
        return number, line.rstrip("\r\n")[:500]


def _swallowed(cell: str) -> bool:
    r"""Whether a quoted cell that spans lines took in the next row: after its first line break
    it holds a comma or a quote, as a row does (`1,"` then `2,"5"`), where a value written
    over lines (`"<newline>5"`, `"5<newline>"`) holds neither.

    >>> _swallowed('\n2,5"'), _swallowed('\n2024-01-01 00:01:00"'), _swallowed('\n5'), _swallowed('5\n')
    (True, True, False, False)
    """
    text = cell.rstrip(_BLANK)
    breaks = [i for i in (text.find("\n"), text.find("\r")) if i >= 0]
    return bool(breaks) and any(c in text[min(breaks):] for c in ',"')


def _blank(row: list[str]) -> bool:
    """A blank line, as ``csv.reader`` gives it."""
    return not row or (len(row) == 1 and not row[0].strip(_BLANK))


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _basic_date(cell: str) -> str | None:
    """The date a timestamp cell such as ``20240130`` spells in ISO 8601's basic form
    (``2024-01-30``), or None. As epoch seconds it would be a moment in August 1970, which
    a recording's first timestamp is not: such a column is refused, not read as that.

    >>> _basic_date(" 20240130 "), _basic_date("1700000000"), _basic_date("20241301")
    ('2024-01-30', None, None)
    """
    text = cell.strip()
    if len(text) != 8 or not text.isdigit() or not text.isascii():
        return None
    try:
        day = datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
    return day.isoformat() if 1900 <= day.year <= 2100 else None


def _number_or_text(text: str) -> float | str:
    """A CSV cell as a float if it spells one (NaN and inf included), else its text."""
    text = text.strip()
    if not text:
        return None  # type: ignore[return-value]  # an empty cell is a missing value
    if not text.isascii() or "_" in text:  # float() also reads "1_000" and other scripts' digits
        return text
    try:
        return float(text)
    except ValueError:
        return text


def read_series(path: str | Path, fmt: str | None = None, bad: Counter | None = None
                ) -> dict[tuple[str, str], np.ndarray]:
    """Every stream of a recording as an array of its accepted values, keyed ``(device, channel)``;
    the rejected records are counted by reason in ``bad``."""
    series: dict[tuple[str, str], list[float]] = {}
    for batch in FileSource(path, fmt, batch_size=10_000).batches():
        if bad is not None:
            bad.update(b.reason.value for b in batch.bad)
        for reading in batch.readings:
            for channel, value in reading.values.items():
                series.setdefault((reading.device, channel), []).append(value)
    return {k: np.asarray(v, dtype=np.float64) for k, v in series.items()}


class ScoreCsvWriter:
    """Writes ``ts,device,score,anomaly,channel,surprise``, one row per reading; empty while
    warming.  The surprise ranks what the score, rounded to 1 past ~6 at six decimals, cannot.

    >>> out = io.StringIO()
    >>> writer = ScoreCsvWriter(out)
    >>> writer.write([Score("pump-7", 1700000000.0, None, None),
    ...               Score("pump-7", 1700000300.0, 0.9999995, True, "temp", surprise=6.30103)])
    >>> print(out.getvalue(), end="")
    ts,device,score,anomaly,channel,surprise
    1700000000,pump-7,,,,
    1700000300,pump-7,1.000000,1,temp,6.30103
    """

    HEADER = ("ts", "device", "score", "anomaly", "channel", "surprise")

    def __init__(self, out: IO[str]) -> None:
        self._writer = csv.writer(out, lineterminator="\n")
        # csv quotes a field holding the line terminator, here "\n" alone: a name with a bare
        # "\r" (JSON's escape allows it) would end its row early for readers. Such rows are
        # written with every field quoted.
        self._quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
        self._writer.writerow(self.HEADER)

    def write(self, scores: list[Score]) -> None:
        rows = [(format_ts(s.ts), s.device,
                 "" if s.score is None else f"{s.score:.6f}",
                 "" if s.anomaly is None else int(s.anomaly),
                 s.channel or "",
                 "" if s.surprise is None else f"{s.surprise:.6g}")
                for s in scores]
        if not any("\r" in s.device or (s.channel and "\r" in s.channel) for s in scores):
            self._writer.writerows(rows)
            return
        for row in rows:
            (self._quoted if "\r" in row[1] or "\r" in row[4] else self._writer).writerow(row)


class DeadLetterWriter:
    """Bad records as JSON lines: reason, detail, where, and the raw record.

    >>> out = io.StringIO()
    >>> bad = BadRecord(BadReason.NON_NUMERIC_VALUE, "'oops' is not a number", "line 3", "5,oops")
    >>> DeadLetterWriter(out).write([bad])
    >>> print(out.getvalue(), end="")
    {"reason": "non_numeric_value", "detail": "'oops' is not a number", "ref": "line 3", "raw": "5,oops"}
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def write(self, bad: list[BadRecord]) -> None:
        for b in bad:
            self._out.write(json.dumps({"reason": b.reason.value, "detail": b.detail, "ref": b.ref, "raw": b.raw}) + "\n")


def format_ts(ts: float) -> str:
    """Shortest exact text for a timestamp: ``1700000000`` rather than ``1700000000.0``.

    >>> format_ts(1700000000.0), format_ts(12.25)
    ('1700000000', '12.25')
    """
    if math.isfinite(ts) and ts == int(ts):
        return str(int(ts))
    return repr(ts)
