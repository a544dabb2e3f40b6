"""What the chaos and soak benchmarks share: progress lines timed from the start, and the
daemons they start, killed on the way out whatever happens (``kill_children``)."""
from __future__ import annotations

import subprocess
import time

from connectors.tansu import end_process

CHILDREN: list[subprocess.Popen] = []  # every daemon started; a script appends each one
_T0 = time.monotonic()


def say(*parts) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s]", *parts, flush=True)


def kill_children() -> None:
    for proc in CHILDREN:
        if proc.poll() is None:
            say(f"cleanup: SIGKILL daemon pid {proc.pid}")
        end_process(proc, grace_s=10, kill=True)
