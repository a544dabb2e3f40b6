"""What flows through the pipeline: readings in, scores and bad records out.

Every source (file, Kafka) turns its raw records into ``Reading`` objects with
``parse_message`` or its own parser; anything that is not a clean reading
becomes a ``BadRecord`` with one of the ``BadReason`` values, never a guess.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from numbers import Real


class BadReason(str, Enum):
    """Why a record was rejected; a bounded set, safe as a metric label.

    >>> parse_message("{").bad[0].reason
    <BadReason.MALFORMED: 'malformed'>
    >>> BadReason("stream_limit") is BadReason.STREAM_LIMIT  # from the value a label or a dead letter carries
    True
    """

    MALFORMED = "malformed"                  # not parseable at all (bad JSON, bad CSV row)
    NOT_AN_OBJECT = "not_an_object"
    MISSING_DEVICE = "missing_device"
    BAD_DEVICE = "bad_device"                # not a non-empty string or integer, or too long
    BAD_CHANNEL = "bad_channel"              # a channel name that is empty or too long
    MISSING_TIMESTAMP = "missing_timestamp"
    BAD_TIMESTAMP = "bad_timestamp"
    MISSING_VALUE = "missing_value"
    NON_NUMERIC_VALUE = "non_numeric_value"
    NON_FINITE_VALUE = "non_finite_value"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    DUPLICATE_TIMESTAMP = "duplicate_timestamp"
    OUT_OF_ORDER_TIMESTAMP = "out_of_order_timestamp"
    STREAM_LIMIT = "stream_limit"            # more streams than the configured cap


@dataclass(slots=True)
class Reading:
    """One message from one device: a timestamp and a value per channel.

    ``ref`` says where it came from (``"line 12"``, ``"sensors/3@1042"``) for errors.

    >>> Reading("pump-7", 1700000000.0, {"temp": 71.2}).values["temp"]
    71.2
    """

    device: str
    ts: float
    values: dict[str, float]
    ref: str = ""


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A rejected record or value, with the reason and enough context to find it.

    >>> bad = parse_message('{"device": "p1", "ts": 5, "values": {"a": 1.5, "b": null}}', ref="line 3").bad
    >>> [str(b) for b in bad]  # the form the logs and the dead-letter output show
    ["line 3: missing_value: device 'p1' channel 'b': null value"]
    >>> bad[0].raw  # the record itself, cut to 500 characters
    '{"device": "p1", "ts": 5, "values": {"a": 1.5, "b": null}}'
    """

    reason: BadReason
    detail: str
    ref: str = ""
    raw: str | None = None

    def __str__(self) -> str:
        where = f"{self.ref}: " if self.ref else ""
        return f"{where}{self.reason.value}: {self.detail}"


@dataclass(slots=True)
class Score:
    """The verdict on one reading. ``score`` is None while the device warms up.

    ``channel`` names the most surprised channel; ``forecast`` and ``value`` are
    that channel's.  ``surprise`` is -log10 of the tail probability behind ``score``
    (3 for 0.999), of all the reading's channels together unless the pipeline
    combines them by the worst (``ScoringConfig.channel_combination``): the same
    order as ``score`` without ties near 1, for ranking.

    >>> Score("pump-7", 1700000000.0, None, None).anomaly is None  # warming: no verdict yet
    True
    >>> s = Score("pump-7", 1700000060.0, 0.999, True, "temp", forecast=71.0, value=93.5, surprise=3.0)
    >>> s.anomaly, s.channel, s.value - s.forecast
    (True, 'temp', 22.5)
    """

    device: str
    ts: float
    score: float | None
    anomaly: bool | None
    channel: str | None = None
    forecast: float | None = None
    value: float | None = None
    ref: str = ""
    surprise: float | None = None


@dataclass(frozen=True)
class MessageFormat:
    """Field names of a JSON reading message (see the README).

    >>> msg = '{"sensor": "p1", "time": 5, "value": 2.0}'
    >>> parse_message(msg, MessageFormat(device="sensor", ts="time")).reading
    Reading(device='p1', ts=5.0, values={'value': 2.0}, ref='')
    >>> [b.reason.value for b in parse_message(msg).bad]  # the default names do not match it
    ['missing_device']
    """

    device: str = "device"
    ts: str = "ts"
    values: str = "values"
    value: str = "value"
    max_abs_value: float = 1e15
    # Names travel into every score, event, dead letter, snapshot and metric label: an
    # unbounded one could make an output record larger than the broker takes.
    max_name_length: int = 256


# |ts| beyond this (year 5138) is refused: most often epoch milliseconds sent as seconds,
# which would otherwise put every later, correct reading of the stream "out of order".
MAX_TIMESTAMP = 1e11


# The ISO 8601 forms taken, the same on every Python version (``datetime.fromisoformat``
# takes more on 3.11 than on 3.10, basic forms like "20240101" among them, and cuts fractions
# to microseconds): a date, or a date and a time to the minute, second or any fraction of it,
# with "Z" or an offset.
_ISO_8601 = re.compile(r"(\d{4})-(\d\d)-(\d\d)(?:[Tt ](\d\d):(\d\d)(?::(\d\d)([.,]\d+)?)?"
                       r"(?:([Zz])|([+-])(\d\d)(?::?(\d\d))?)?)?", re.ASCII)  # ASCII: no other scripts' digits


def _iso_seconds(raw: str) -> float:
    """Epoch seconds of an ISO 8601 date or date and time; naive means UTC.

    >>> _iso_seconds("2023-11-14T22:13:20.5Z"), _iso_seconds("2023-11-14 23:13:20.25+0100")
    (1700000000.5, 1700000000.25)
    >>> _iso_seconds("20231114")
    Traceback (most recent call last):
    ...
    ValueError: not ISO 8601 (YYYY-MM-DD[THH:MM[:SS[.f]][Z|+HH:MM]]) or epoch seconds: '20231114'
    """
    m = _ISO_8601.fullmatch(raw.strip())
    try:
        if m is None:
            raise ValueError
        year, month, day, hour, minute, second, fraction, _, sign, off_h, off_m = m.groups()
        at = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
                      tzinfo=timezone.utc)
        if sign is not None and (int(off_h) > 23 or int(off_m or 0) > 59):
            raise ValueError
        offset = 0 if sign is None else (1 if sign == "+" else -1) * (int(off_h) * 3600 + int(off_m or 0) * 60)
    except ValueError:
        raise ValueError("not ISO 8601 (YYYY-MM-DD[THH:MM[:SS[.f]][Z|+HH:MM]]) or epoch seconds: "
                         f"{raw[:40]!r}") from None
    return at.timestamp() - offset + (float("0." + fraction[1:]) if fraction else 0.0)


def _utc(ts: float) -> str:
    """``ts`` as an ISO 8601 time in UTC, to the second (``repr`` outside the years 1 to 9999).

    >>> _utc(1700000000.9), _utc(-1e12)
    ('2023-11-14T22:13:20Z', '-1000000000000.0')
    """
    try:
        return datetime.fromtimestamp(int(ts), timezone.utc).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return repr(ts)


def parse_timestamp(raw: object) -> float:
    """Epoch seconds from a JSON number or an ISO 8601 string (naive means UTC).

    >>> parse_timestamp("2014-07-15 04:35:00")
    1405398900.0
    >>> parse_timestamp(1700000000)
    1700000000.0
    >>> parse_timestamp(1700000000000)
    Traceback (most recent call last):
    ...
    ValueError: 1700000000000 is past year 5138: epoch milliseconds? ts is in seconds
    """
    if isinstance(raw, bool):
        raise ValueError("a boolean is not a timestamp")
    if isinstance(raw, (int, float)):
        try:
            ts = float(raw)
        except OverflowError:  # an integer beyond float range: judged by the range check below
            ts = math.inf if raw > 0 else -math.inf
    elif isinstance(raw, str):
        ts = _iso_seconds(raw)
    else:
        raise ValueError(f"a {type(raw).__name__} is not a timestamp")
    if math.isnan(ts) or (math.isinf(ts) and isinstance(raw, float)):
        raise ValueError(f"non-finite timestamp {raw!r}")
    if not -MAX_TIMESTAMP <= ts <= MAX_TIMESTAMP:
        hint = "" if isinstance(raw, str) else ": epoch milliseconds? ts is in seconds"
        raise ValueError(f"{str(raw)[:40]} is {'past year 5138' if ts > 0 else 'before year -1199'}{hint}")
    return ts


def check_value(raw: object, max_abs: float) -> tuple[float | None, BadReason | None, str]:
    """Accept a JSON number as a float; anything else gets a reason.

    >>> check_value("3.1", 1e15)
    (None, <BadReason.NON_NUMERIC_VALUE: 'non_numeric_value'>, "'3.1' is a str, not a number")
    >>> check_value(float("1e400"), 1e15)[2]  # JSON's parser has already made 1e400 an inf
    'inf (Infinity, or a number beyond float range)'
    """
    if raw is None:
        return None, BadReason.MISSING_VALUE, "null value"
    if isinstance(raw, bool) or not isinstance(raw, Real):  # Real: numpy's numbers too, for library callers
        return None, BadReason.NON_NUMERIC_VALUE, f"{str(raw)[:40]!r} is a {type(raw).__name__}, not a number"
    try:
        value = float(raw)
    except OverflowError:  # an integer beyond float range
        return None, BadReason.VALUE_OUT_OF_RANGE, f"{str(raw)[:40]} overflows a float"
    if math.isinf(value):
        return None, BadReason.NON_FINITE_VALUE, f"{value!r} (Infinity, or a number beyond float range)"
    if value != value:
        return None, BadReason.NON_FINITE_VALUE, "nan"
    if abs(value) > max_abs:
        return None, BadReason.VALUE_OUT_OF_RANGE, f"|{value!r}| > {max_abs:g}"
    return value, None, ""


@dataclass(slots=True)
class Parsed:
    """A message's reading (None if nothing in it was usable) and what was rejected.

    >>> p = parse_message('{"device": "p1", "ts": 5, "values": {"a": 1.5, "b": "x"}}')
    >>> p.reading.values, [b.reason.value for b in p.bad]  # the good channel is kept
    ({'a': 1.5}, ['non_numeric_value'])
    >>> p = parse_message(b'{"device": "p1", "ts": 5')
    >>> p.reading, [b.reason.value for b in p.bad]
    (None, ['malformed'])
    """

    reading: Reading | None
    bad: list[BadRecord] = field(default_factory=list)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """An object whose names are unique: with two of one name, a JSON parser keeps the last
    and drops the other without a word (which device, which value?)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the name {twice[:40]!r} appears twice in one object")
    return obj


# built once: json.loads with a hook would build a decoder per message
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
_INT64 = float(2 ** 63)
_MAX_DEPTH = 64  # far beyond any reading message, far below the exact parser's stack
_LONG = 8192  # characters: nested at most 4,096 deep, which every orjson takes


def _brackets(raw: bytes | str) -> int:
    return raw.count(b"{") + raw.count(b"[") if type(raw) is bytes else raw.count("{") + raw.count("[")


def _fast_json(raw: bytes | str) -> dict | None:
    """The message's object by orjson (~1 us against ~2.7 for the standard library's parser,
    a tenth of a record's whole cost in the daemon), or None where only the exact parser can
    say what the message holds: orjson refused it (NaN, a lone surrogate, a number too large:
    the exact parser gives the reason), it is not an object, it nests past ``_MAX_DEPTH`` (the
    exact parser may run out of stack where this would not; a long message with more brackets
    than that is not even given to orjson, whose older versions crash on deep nesting), one of
    its names may appear twice, or it has an integer past 64 bits (orjson reads it as a float:
    a device id of 20 digits would stop being a name).

    A name given twice is what orjson hides (it keeps the last): a message holds one colon per
    name and the colons inside its strings; the parsed object has as many unless a pair was
    dropped.  Strings are counted only where the text has no escape (else ``\\u003a`` could
    stand for a colon the text does not show): such messages go the exact way.

    >>> _fast_json(b'{"device": "p1", "ts": "2024-01-01T00:00:00Z", "values": {"a": 1.5}}')
    {'device': 'p1', 'ts': '2024-01-01T00:00:00Z', 'values': {'a': 1.5}}
    >>> [_fast_json(m) for m in (b'{"device": "p1", "device": "p2"}', b'{"ts": "12:00", "ts": "13:00"}',
    ...                           b'{"v": NaN}', b'{"device": 123456789012345678901234567890}', b'[1]')]
    [None, None, None, None, None]
    """
    # orjson before 3.9.15 has no depth limit: 60,000 nested brackets (300 KB) overran its C stack,
    # a segfault no handler sees, and the daemon died on the record at every restart. A message
    # that could nest that deep is long and has that many brackets: the exact parser says what it
    # holds (a short one, which nests too little to matter, is not counted: the count costs ~0.3 us)
    if len(raw) > _LONG and _brackets(raw) > _MAX_DEPTH:
        return None
    try:
        msg = _orjson_loads(raw)
    except ValueError:  # orjson.JSONDecodeError is one
        return None
    if type(msg) is not dict:
        return None
    names = _names(msg, 0)
    if names < 0:
        return None
    colons = raw.count(b":" if type(raw) is bytes else ":")
    if colons == names:
        return msg
    if colons > names and (b"\\" if type(raw) is bytes else "\\") not in raw \
            and colons == names + _colons_in_strings(msg):
        return msg
    return None


def _names(obj: dict | list, depth: int) -> int:
    """Names in ``obj``'s objects, nested ones included; -1 where a float could be an integer
    orjson read past 64 bits, or where ``obj`` nests past ``_MAX_DEPTH``."""
    if depth > _MAX_DEPTH:
        return -1
    n = len(obj) if type(obj) is dict else 0
    for v in obj.values() if type(obj) is dict else obj:
        t = type(v)
        if t is dict or t is list:
            inner = _names(v, depth + 1)
            if inner < 0:
                return -1
            n += inner
        elif t is float and not -_INT64 < v < _INT64:
            return -1
    return n


def _colons_in_strings(obj: dict | list) -> int:
    """Colons inside the names and string values of ``obj`` (nested no deeper than ``_names``
    allowed)."""
    n = sum(k.count(":") for k in obj) if type(obj) is dict else 0
    for v in obj.values() if type(obj) is dict else obj:
        t = type(v)
        if t is str:
            n += v.count(":")
        elif t is dict or t is list:
            n += _colons_in_strings(v)
    return n


try:
    from orjson import loads as _orjson_loads
except ImportError:  # the standard library's parser alone: slower, the same readings
    def _fast_json(raw: bytes | str) -> dict | None:  # noqa: F811
        return None


def parse_message(raw: bytes | str | None, fmt: MessageFormat = MessageFormat(), ref: str = "",
                  latest: float = math.inf) -> Parsed:
    """Parse one JSON reading message; bad channels are rejected, good ones kept.

    A reading stamped after ``latest`` is refused as ``bad_timestamp``: the daemon passes its
    clock plus ``kafka.max_timestamp_ahead_s``, since one reading from a clock far ahead would
    put every later reading of its streams out of order until that time came.

    >>> parse_message('{"device": "p1", "ts": 5, "values": {"a": 1.5, "b": "x"}}').reading.values
    {'a': 1.5}
    >>> [b.reason.value for b in parse_message('{"device": "p1", "value": 2}').bad]
    ['missing_timestamp']
    >>> [b.detail for b in parse_message('{"device": "p1", "device": "p2", "ts": 5, "value": 2}').bad]
    ["invalid JSON (the name 'device' appears twice in one object)"]
    >>> [(b.detail, b.raw) for b in parse_message(None).bad]  # a Kafka record with no value
    [('a null value (a tombstone), not a reading message', None)]
    >>> [b.detail for b in parse_message('{"device": "p1", "ts": 1800000000, "value": 2}', latest=1700086400.0).bad]
    ["ts 1800000000.0 (2027-01-15T08:00:00Z) is after 2023-11-15T22:13:20Z, this instance's clock plus kafka.max_timestamp_ahead_s: a clock this far ahead would put the device's later readings out of order"]
    """
    def refuse(reason: BadReason, detail: str) -> Parsed:
        return Parsed(None, [BadRecord(reason, detail, ref, excerpt(raw))])

    if raw is None:  # told apart from an empty value: its dead letter's raw is null, not ""
        return Parsed(None, [BadRecord(BadReason.MALFORMED, "a null value (a tombstone), not a reading message", ref)])

    try:
        msg = _fast_json(raw) if type(raw) is bytes or type(raw) is str else None
        if msg is None:
            # decode first: json.loads on bytes sniffs the encoding, which costs more than decoding
            msg = _DECODER.decode(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return refuse(BadReason.MALFORMED, f"invalid JSON ({exc})")
    if type(msg) is not dict:
        return refuse(BadReason.NOT_AN_OBJECT, f"a JSON {type(msg).__name__}, not an object")
    device = msg.get(fmt.device)
    max_name = fmt.max_name_length
    if type(device) is not str or not device or len(device) > max_name:
        if fmt.device not in msg:
            return refuse(BadReason.MISSING_DEVICE, f"no {fmt.device!r} field")
        if type(device) is str and len(device) > max_name:
            return refuse(BadReason.BAD_DEVICE, f"device name of {len(device)} characters, "
                                                  f"more than {max_name}: {device[:40]!r}...")
        if type(device) is not int:
            return refuse(BadReason.BAD_DEVICE, f"device must be a non-empty string, got {str(device)[:40]!r}")
        device = str(device)
        if len(device) > max_name:
            return refuse(BadReason.BAD_DEVICE, f"device id of {len(device)} digits, more than {max_name}")
    if not encodes_as_utf8(device):
        return refuse(BadReason.BAD_DEVICE, f"device name {device[:40]!r} is not valid Unicode (a lone surrogate)")
    ts = msg.get(fmt.ts)
    if type(ts) is not float or not -MAX_TIMESTAMP <= ts <= MAX_TIMESTAMP:  # the common case: one check
        if fmt.ts not in msg:
            return refuse(BadReason.MISSING_TIMESTAMP, f"no {fmt.ts!r} field")
        if ts is None:  # as a null value is a missing value
            return refuse(BadReason.MISSING_TIMESTAMP, f"null {fmt.ts!r}")
        try:
            ts = parse_timestamp(ts)
        except ValueError as exc:
            return refuse(BadReason.BAD_TIMESTAMP, str(exc))
    if ts > latest:
        return refuse(BadReason.BAD_TIMESTAMP, f"ts {ts!r} ({_utc(ts)}) is after {_utc(latest)}, this instance's "
                                                 "clock plus kafka.max_timestamp_ahead_s: a clock this far ahead "
                                                 "would put the device's later readings out of order")
    if fmt.values in msg:
        if fmt.value in msg:  # whatever either holds: the message's shape is wrong, not a value
            return refuse(BadReason.MALFORMED, f"both {fmt.values!r} and {fmt.value!r}: one of them, not both")
        raw_values = msg[fmt.values]
        if not isinstance(raw_values, dict) or not raw_values:
            return refuse(BadReason.MISSING_VALUE, f"{fmt.values!r} must be a non-empty object")
    elif fmt.value in msg:
        raw_values = {fmt.value: msg[fmt.value]}
    else:
        return refuse(BadReason.MISSING_VALUE, f"neither {fmt.values!r} nor {fmt.value!r} present")
    values: dict[str, float] = {}
    rejected: list[tuple[BadReason, str, str]] = []
    max_abs = fmt.max_abs_value
    for channel, raw_value in raw_values.items():
        if type(raw_value) is float and -max_abs <= raw_value <= max_abs and 0 < len(channel) <= max_name \
                and channel.isascii():
            values[channel] = raw_value  # the common case: finite, in range, a sane name
            continue
        if not 0 < len(channel) <= max_name:
            rejected.append((BadReason.BAD_CHANNEL, channel[:40], f"a name of {len(channel)} characters, "
                                                                  f"expected 1 to {max_name}"))
            continue
        if not encodes_as_utf8(channel):
            rejected.append((BadReason.BAD_CHANNEL, channel[:40], "a name that is not valid Unicode (a lone "
                                                                  "surrogate)"))
            continue
        value, reason, detail = check_value(raw_value, max_abs)
        if reason is None:
            values[channel] = value
        else:
            rejected.append((reason, channel, detail))
    bad = by_reason(device, rejected, ref, excerpt(raw)) if rejected else []
    return Parsed(Reading(device, ts, values, ref) if values else None, bad)


# a dead letter's detail names a message's refused channels up to this many characters (its raw
# message is cut to 500, so the detail is where the names of a wide one survive)
NAMES_SHOWN = 2000


def by_reason(device: str, rejected: list[tuple[BadReason, str, str]], ref: str = "",
              raw: str | None = None) -> list[BadRecord]:
    """One bad record per reason for the channels of one reading, from ``(reason, channel,
    detail)``: a message of forty channels sent twice, or all NaN, is one dead letter
    carrying it, not forty copies of it, and counts once against the bad-record rate.

    >>> by_reason("p1", [(BadReason.NON_FINITE_VALUE, "a", "nan")])[0].detail
    "device 'p1' channel 'a': nan"
    >>> [b.detail for b in by_reason("p1", [(BadReason.DUPLICATE_TIMESTAMP, c, "ts 5.0 after 5.0") for c in "abc"])]
    ["device 'p1' channels 'a', 'b', 'c': ts 5.0 after 5.0"]
    >>> by_reason("p1", [(BadReason.MISSING_VALUE, f"c{i}", "null value") for i in range(1000)])[0].detail[-40:]
    " 'c262', 'c263' and 736 more: null value"
    >>> [str(b) for b in by_reason("p1", [(BadReason.NON_NUMERIC_VALUE, "a", "'x' is a str, not a number"),
    ...                                   (BadReason.NON_FINITE_VALUE, "b", "nan"),
    ...                                   (BadReason.NON_NUMERIC_VALUE, "c", "[] is a list, not a number")])]
    ["non_numeric_value: device 'p1' channels 'a': 'x' is a str, not a number; 'c': [] is a list, not a number", \
"non_finite_value: device 'p1' channel 'b': nan"]
    """
    grouped: dict[BadReason, list[tuple[str, str]]] = {}
    for reason, channel, detail in rejected:
        grouped.setdefault(reason, []).append((channel, detail))
    out = []
    for reason, channels in grouped.items():
        if len(channels) == 1:
            (channel, detail), = channels
            text = f"device {device!r} channel {channel!r}: {detail}"
        else:
            same = len({detail for _, detail in channels}) == 1
            parts, size = [], 0
            for channel, detail in channels:  # as many as fit NAMES_SHOWN characters, at least one
                part = repr(channel) if same else f"{channel!r}: {detail}"
                if parts and size + len(part) > NAMES_SHOWN:
                    break
                parts.append(part)
                size += len(part) + 2
            more = f" and {len(channels) - len(parts)} more" if len(channels) > len(parts) else ""
            if same:
                text = f"device {device!r} channels {', '.join(parts)}{more}: {channels[0][1]}"
            else:
                text = f"device {device!r} channels {'; '.join(parts)}{more and ';' + more}"
        out.append(BadRecord(reason, text, ref, raw))
    return out


def encodes_as_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8.  JSON's escapes can spell a lone surrogate
    (``"\\ud800"``), which every output (CSV, Kafka keys, metric labels) would fail on; a file
    read with ``surrogateescape`` holds one where its bytes were not UTF-8.

    >>> encodes_as_utf8("pump-\u00e4"), encodes_as_utf8(b"pump-\\xe4".decode("utf-8", "surrogateescape"))
    (True, False)
    """
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def excerpt(raw: bytes | str) -> str:
    """A record as the dead letters keep it: text, cut to 500 characters; bytes that are not
    UTF-8 as ``\\xNN`` escapes, which show what they were (U+FFFD would not).

    >>> excerpt(bytes([112, 255, 49]))  # p, a byte that is no UTF-8, 1
    'p\\\\xff1'
    """
    text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, (bytes, bytearray)) else raw
    return text[:500]
