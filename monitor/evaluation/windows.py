"""Comparing what the detector flagged with labelled anomaly windows (the demo's report)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from monitor.readings import Score, parse_timestamp


@dataclass
class WindowHit:
    start: float
    end: float
    first_detection: float | None   # ts of the first flag inside the window


@dataclass
class WindowReport:
    """Which labelled windows were caught, and how many flags fell outside all of them."""

    windows: list[WindowHit]
    flags_outside: int
    flags_total: int

    @property
    def detected(self) -> int:
        return sum(w.first_detection is not None for w in self.windows)


def load_windows(path: str | Path, key: str | None = None) -> list[tuple[float, float]]:
    """Windows from a NAB ``combined_windows.json``-style file (one series, or the one named ``key``)."""
    data = json.loads(Path(path).read_text())
    if key is None:
        if len(data) != 1:
            raise ValueError(f"{path} labels {len(data)} series; say which")
        key = next(iter(data))
    return [(parse_timestamp(a), parse_timestamp(b)) for a, b in data[key]]


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
