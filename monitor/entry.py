"""The ``forewarn`` command's entry point, kept apart from ``monitor.cli`` so that it runs before
torch loads (a second or more): a Ctrl-C meanwhile ends the process as SIGTERM does, quietly,
with nothing started, instead of a traceback from inside the imports.  The shell still sees
130.  From then on ``monitor.cli`` handles it ("forewarn: interrupted")."""
from __future__ import annotations

import signal


def main(argv: list[str] | None = None) -> int:
    # only Python's own handler: a SIGINT ignored by whoever started it (`cmd &` in a script) stays so
    quiet = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if quiet:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        from monitor.cli import main as cli_main
    finally:
        if quiet:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return cli_main(argv)
