import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from connectors.tansu import free_port
from monitor.cli import main
from tests.kafka_support import ROOT, http_get, wait_for


def test_demo_runs_the_whole_system_through_an_embedded_broker(capsys):
    assert main(["demo", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "22695 readings through Kafka" in out
    # every reading scored (at least once: a lost partition delivers its uncommitted records again),
    # as offline: the demo used to stop on a count of records that counted those twice, and report
    # half the recording
    counts = re.search(r"scored (\d+), anomalies \d+ .*; bad records (\d+) ", out)
    assert int(counts.group(1)) >= 22427 and int(counts.group(2)) >= 12
    # anomalies are printed live, as the daemon finds them, before the summary
    live = [line for line in out.splitlines() if line.startswith("anomaly ")]
    assert live and out.index(live[0]) < out.index("readings through Kafka")
    caught = int(re.search(r"Labelled anomaly windows caught: (\d) of 4", out).group(1))
    assert caught >= 2
    assert re.search(r"Metrics were served at http://127.0.0.1:\d+/metrics", out)


def _children(pid: int, named: str) -> list[int]:
    """Processes whose parent is ``pid`` and whose command line holds ``named``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and named.encode() in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            pass
    return found


def _alive(pid: int) -> bool:
    try:  # a zombie has exited: only its parent's wait is missing
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_interrupted_demo_says_so_exits_130_and_takes_its_publisher_with_it():
    """Before, a SIGINT stopped the daemon, and the demo printed its comparison with the labelled
    windows as if complete, exited 0 and left replay-to-kafka running under init."""
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "monitor.cli", "--threads", "1", "demo", "--quiet", "--speed", "600",
                             "--metrics-port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    publishers: list[int] = []
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 180, what="the demo's daemon")
        publishers = wait_for(lambda: _children(demo.pid, "replay-to-kafka"), 60, what="the demo's publisher")
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=120)
        assert demo.returncode == 130, err
        assert "forewarn: interrupted after" in err and "no comparison with the labelled windows" in err
        assert "readings through Kafka" not in out and "Labelled anomaly windows" not in out
        assert not any(_alive(p) for p in publishers)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for p in publishers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_demo_that_fails_to_start_takes_its_publisher_with_it(capsys, monkeypatch):
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)
    monkeypatch.setattr(subprocess, "Popen", Recorded)
    handler = signal.getsignal(signal.SIGINT)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        try:
            code = main(["demo", "--quiet", "--metrics-port", str(busy.getsockname()[1])])
            publishers = [p for p in started if "replay-to-kafka" in p.args]
            assert code == 2 and "Address already in use" in capsys.readouterr().err
            assert publishers and all(p.returncode is not None for p in publishers)  # ended and reaped
            assert signal.getsignal(signal.SIGINT) is handler  # the daemon's handler does not outlive the demo
        finally:
            for p in started:
                if p.poll() is None:
                    p.kill()
                    p.wait()
