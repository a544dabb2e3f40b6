"""The ``forewarn`` command's entry point, kept apart from ``monitor.cli`` so that it runs before
torch loads (a second or more): a Ctrl-C meanwhile ends the process as SIGTERM does, quietly,
with nothing started, instead of a traceback from inside the imports.  The shell still sees
130.  From then on ``monitor.cli`` handles it ("forewarn: interrupted")."""
from __future__ import annotations

import signal


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    from monitor.cli import main as cli_main
    signal.signal(signal.SIGINT, previous)
    return cli_main(argv)
