import re

from monitor.cli import main


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
