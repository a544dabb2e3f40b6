"""Comparing what the detector flagged with labelled anomaly windows (the demo's report)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from monitor.readings import Score, parse_timestamp


@dataclass
class WindowHit:
    """One labelled window and the first flag inside it (None: missed).

    >>> report = compare_with_windows([Score("d", t, 1.0, True) for t in (5.0, 6.0)], [(4.0, 8.0)])
    >>> hit = report.windows[0]
    >>> hit
    WindowHit(start=4.0, end=8.0, first_detection=5.0)
    >>> hit.first_detection - hit.start  # how far into the window the detector took to flag it
    1.0
    """

    start: float
    end: float
    first_detection: float | None   # ts of the first flag inside the window


@dataclass
class WindowReport:
    """Which labelled windows were caught, and how many flags fell outside all of them.

    >>> flags = [Score("d", t, 1.0, True) for t in (3.0, 9.0, 10.0)]
    >>> report = compare_with_windows(flags, [(2.0, 4.0), (6.0, 7.0)])
    >>> report.detected, len(report.windows), report.flags_outside, report.flags_total
    (1, 2, 2, 3)
    >>> [(w.start, w.end) for w in report.windows if w.first_detection is None]
    [(6.0, 7.0)]
    """

    windows: list[WindowHit]
    flags_outside: int
    flags_total: int

    @property
    def detected(self) -> int:
        return sum(w.first_detection is not None for w in self.windows)


def parse_windows(data: object, source: str) -> dict[str, list[tuple[float, float]]]:
    """Series name -> its labelled windows, from NAB's ``{"name": [[start, end], ...]}`` layout.

    >>> parse_windows({"a.csv": [["2014-01-01 00:00:00", 1388538000]]}, "labels.json")
    {'a.csv': [(1388534400.0, 1388538000.0)]}
    >>> parse_windows([["2014-01-01", "2014-01-02"]], "labels.json")
    Traceback (most recent call last):
    ...
    ValueError: labels.json: expected an object of series names, each with a list of [start, end] windows; got a list
    >>> parse_windows({"a.csv": [["2014-01-02", "2014-01-01"]]}, "labels.json")
    Traceback (most recent call last):
    ...
    ValueError: labels.json: 'a.csv': the window [2014-01-02, 2014-01-01] ends before it starts
    """
    layout = "expected an object of series names, each with a list of [start, end] windows"
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {layout}; got a {type(data).__name__}")
    out = {}
    for name, windows in data.items():
        if not isinstance(windows, list) or not all(isinstance(w, list) and len(w) == 2 for w in windows):
            raise ValueError(f"{source}: {name!r}: {layout}; got {str(windows)[:80]}")
        try:
            out[name] = [(parse_timestamp(a), parse_timestamp(b)) for a, b in windows]
        except ValueError as exc:
            raise ValueError(f"{source}: {name!r}: {exc}") from None
        backwards = next(((a, b) for (a, b), (ta, tb) in zip(windows, out[name]) if ta > tb), None)
        if backwards:  # a window no detection can fall in: every series' score would silently drop
            raise ValueError(f"{source}: {name!r}: the window [{backwards[0]}, {backwards[1]}] ends before it starts")
    return out


def read_windows(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Every series' windows from a NAB ``combined_windows.json``-style file."""
    try:
        return parse_windows(json.loads(Path(path).read_text()), str(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None


def load_windows(path: str | Path, key: str | None = None) -> list[tuple[float, float]]:
    """Windows from a NAB ``combined_windows.json``-style file (one series, or the one named ``key``)."""
    data = read_windows(path)
    if key is None:
        if len(data) != 1:
            raise ValueError(f"{path} labels {len(data)} series; say which")
        key = next(iter(data))
    return data[key]


def compare_with_windows(scores: Iterable[Score], windows: Sequence[tuple[float, float]]) -> WindowReport:
    """Count flags inside and outside labelled windows.

    >>> s = [Score("d", float(t), 1.0, t in (3, 9)) for t in range(12)]
    >>> report = compare_with_windows(s, [(2.0, 4.0), (6.0, 7.0)])
    >>> report.detected, report.flags_outside, report.windows[0].first_detection
    (1, 1, 3.0)
    """
    hits = [WindowHit(a, b, None) for a, b in windows]
    outside = total = 0
    for s in scores:
        if not s.anomaly:
            continue
        total += 1
        for hit in hits:
            if hit.start <= s.ts <= hit.end:
                if hit.first_detection is None:
                    hit.first_detection = s.ts
                break
        else:
            outside += 1
    return WindowReport(hits, outside, total)
