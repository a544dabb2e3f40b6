"""``forewarn run``: the detector attached to a Kafka topic, observable over HTTP.

The loop: poll a batch, score it, send anomaly events and dead letters, wait for
the broker to acknowledge them.  Every ``checkpoint_interval_s`` a checkpoint
writes the state of every device that changed (each snapshot names the input
offset it covers), makes it durable, and only then commits the input offsets.
A crash anywhere replays from the last checkpoint, whose state matches the
committed offsets (at-least-once); nothing is committed that was not delivered.

On partition assignment those partitions are paused, their devices restored
from the state store, and resumed; readings a restored state already covers
(re-delivered after a crash between checkpoint and commit) are skipped.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from collections.abc import Callable

from kafka.errors import CommitFailedError, KafkaError, KafkaTimeoutError, UnknownTopicOrPartitionError
from prometheus_client import CollectorRegistry

from connectors.kafka import error_text, parse_ref
from connectors.partitioners import moved_by_growth
from monitor.checkpoint import Initialization
from monitor.config import STALLED_CHECKPOINTS_ALERT_S, Config
from monitor.http_server import HealthServer
from monitor.logs import fields as _fields
from monitor.metrics import Metrics
from monitor.pipeline import FeedResult, Pipeline
from monitor.readings import Reading
from monitor.scoring import alarm_caveat
from monitor.state import StateCodec, StateError

log = logging.getLogger("forewarn.daemon")
LAG_WARNING_INTERVAL_S = 600.0
RELEASE_AFTER_STREAMS = 64  # ~2 MB each while adapted: a burst this large frees ~128 MB
RELEASE_EVERY_STREAMS = 4096  # a run of batches that never ends its burst still hands back
# a restored state's newest record stamped up to this far ahead of this clock is ordinary skew
# between two instances' clocks; further, its writer's clock was fast (see _place_restored)
SEEN_AHEAD_TOLERANCE_S = 300.0


def release_free_memory() -> float | None:
    """``malloc_trim(0)``: gives the free heap memory back to the system; the seconds it took,
    or None where the C library has no such call (not glibc)."""
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        # the process's own symbols first: find_library runs ldconfig, on the loop's thread
        for library in (lambda: None, lambda: ctypes.util.find_library("c")):
            try:
                _malloc_trim = ctypes.CDLL(library()).malloc_trim
                break
            except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): no such call
                continue
    if not _malloc_trim:
        return None
    started = time.perf_counter()
    _malloc_trim(0)
    return time.perf_counter() - started


_malloc_trim = None  # loaded at first use


def _in_group(source) -> bool:
    """``source.in_group()``; without a source (not consuming yet) nothing speaks for a group."""
    return source is None or source.in_group()


def _offset_on(covered: tuple[int, int] | None, partition: int | None) -> int:
    """The input offset a restored state covers on this partition (-1: none).  Offsets of
    another partition say nothing: a device moves when the input topic gains partitions."""
    if covered is None or covered[0] != partition:
        return -1
    return covered[1]


def _ms_left(deadline: float, cap_ms: int) -> int:
    """Milliseconds until ``deadline`` (a monotonic time), at most ``cap_ms``, at least 1."""
    return max(1, min(cap_ms, int((deadline - time.monotonic()) * 1000)))


class _RevokeDeadline(Exception):
    """The state written on revoke was not acknowledged in the time a rebalance allows."""


class StoppedWhileWaiting(Exception):
    """Stop requested while the broker was not acknowledging: exit without committing.

    >>> daemon = Daemon(Config.load(environ={}), registry=CollectorRegistry())
    >>> daemon.stop()  # SIGTERM during a wait the broker leaves unanswered
    >>> daemon._on_broker_wait(daemon.STOP_GRACE_S)
    Traceback (most recent call last):
    ...
    monitor.daemon.StoppedWhileWaiting
    """


@dataclass
class _CheckpointRound:
    """A checkpoint spread over loop turns: the devices changed before it began are
    written ``state.checkpoint_batch`` per turn; once all are durable, the offsets
    processed before it began are committed."""

    offsets: dict                    # TopicPartition -> next offset, to commit at the end
    todo: list[str]                  # devices still to write
    started: float = field(default_factory=time.perf_counter)
    written: int = 0


class _StartUp:
    """The daemon's start-up on a thread of its own, so that a stop is not held up by it.

    kafka-python's client constructors block until a broker answers (30 s for one that never
    does), and a signal handler can only set a flag: on the main thread, a SIGTERM would wait
    them out.  What the start-up opens it hands over through ``keep``; once given up
    (``give_up``), whatever it opens after is closed on this thread, when its constructor
    returns, and what it had opened is the caller's to close.
    """

    def __init__(self, target: Callable[["_StartUp"], None]) -> None:
        self.opened: dict = {}           # name -> client, opened and handed over
        self.step = "the start-up"       # what it waits for now, for the logs
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._given_up = False
        self._thread = threading.Thread(target=self._run, args=(target,), name="forewarn-start-up", daemon=True)
        self._thread.start()

    def _run(self, target) -> None:
        try:
            target(self)
        except _GivenUp:
            pass
        except BaseException as exc:  # noqa: BLE001  raised again on the waiting thread
            if self._given_up:  # a client closed under it, or the bootstrap it no longer waits for
                log.debug("start-up given up", extra=_fields(error=error_text(exc)))
            else:
                self.error = exc
        finally:
            self.done.set()

    def at(self, step: str) -> None:
        """Now waiting for ``step``; raises ``_GivenUp`` once given up, so that nothing more is done."""
        if self._given_up:
            raise _GivenUp
        self.step = step

    def keep(self, name: str, step: str, make: Callable[[], object]):
        """``make()``, the client handed over as ``name``; raises ``_GivenUp`` once given up."""
        self.at(step)
        client = make()
        with self._lock:
            if not self._given_up:
                self.opened[name] = client
                return client
        if client is not None:
            log.debug("closing a client opened after the start-up was given up", extra=_fields(client=name))
            client.close()
        raise _GivenUp

    def handed_over(self) -> tuple:
        """The state store, the source and the sinks, those not opened (yet) None."""
        with self._lock:
            return tuple(self.opened.get(name) for name in ("store", "source", "sinks"))

    def give_up(self) -> bool:
        """Stop handing over clients; False if it had finished already (then all are handed over)."""
        with self._lock:
            if self.done.is_set() and self.error is None:
                return False
            self._given_up = True
            return True


class _GivenUp(Exception):
    """The start-up was given up (a stop): what it opens now is closed, not handed over."""


class Daemon:
    """One consumer-group member: owns the devices of its partitions.

    ``on_result(result)`` sees every scored batch (the demo prints from it).

    >>> from monitor.readings import Reading
    >>> daemon = Daemon(Config.load(environ={}), registry=CollectorRegistry())
    >>> result = daemon.pipeline.feed([Reading("pump-1", float(t), {"temp": 20.0, "rpm": 900.0}) for t in range(3)])
    >>> daemon.pipeline.streams_by_state()  # a stream per channel, warming until detector.warmup readings
    {'warming': 2, 'adapting': 0, 'live': 0}
    >>> daemon.metrics.observe_scores(result.scores)  # as the loop does after each batch
    >>> daemon.registry.get_sample_value("forewarn_readings_total"), daemon.ready()  # no partitions assigned yet
    (3.0, False)
    """

    def __init__(self, config: Config, registry: CollectorRegistry | None = None,
                 init: Initialization | None = None, on_result: Callable[[FeedResult], None] | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()
        det = config.detector
        self.init = init or (Initialization.load(det.init) if det.init else Initialization.default())
        self.pipeline = Pipeline(self.init, det.pipeline_config(self.init.adapt))
        self.pipeline.progress = self._loop_alive  # a long adaptation burst is progress, not a stuck loop
        self.metrics = Metrics(self.registry, config.metrics.max_devices, self.pipeline.config.scoring)
        self.metrics.describe_state(config.state.store, config.state.checkpoint_interval_s)
        self.on_result = on_result
        self.stopping = threading.Event()
        self.stopped_by: int | None = None  # the signal that stopped it, if one did
        self._looping = False  # the main loop has begun: a stop finishes its batch; before, it ends the start-up
        self._last_turn = time.monotonic()
        self._assigned: set = set()
        self._unassigned_since: float | None = None  # monotonic; None while partitions are held
        self._unassigned_said = 0.0
        self.server: HealthServer | None = None
        self.source = None
        self.batches = 0
        self._batch_started = False  # whether any batch has reached processing (for the exit's log line)
        self.records = 0          # Kafka records processed, their outputs acknowledged
        self.latency_log: list[float] | None = None  # set to a list to keep every latency (benchmarks)
        self.codec = StateCodec(self.init)
        self.store = None
        self._pending: dict = {}                 # TopicPartition -> next offset, processed but not committed
        self._processed: dict[int, int] = {}     # partition -> next offset, processed and delivered
        self._partition_of: dict[str, int] = {}  # device -> the partition it arrives on
        self._round: _CheckpointRound | None = None
        self._out_of_group_logged = -math.inf
        self._to_restore: set = set()            # assigned partitions whose devices are not restored yet
        # restored device -> (input partition, offset) its state covers: offsets of one partition only
        self._covered: dict[str, tuple[int, int]] = {}
        # restored device whose state covers no offset (its partition taken for remade, or saved
        # so after such a restore) -> the newest timestamp its state has seen: a reading no newer
        # is one it has seen (the old topic replayed into the new one, or Tansu's end offsets
        # lagging the true end), skipped rather than rejected as out of order into the dead letters
        self._seen_until: dict[str, float] = {}
        # input partition -> the newest offset restored states cover there: the bad records before
        # it were counted and dead-lettered by the partition's previous owner
        self._bad_handled: dict[int, int] = {}
        self._unsaved: set[str] = set()           # devices whose snapshot could not be saved, already logged
        self._moves_logged = -math.inf            # when devices moving between partitions were last logged
        self._old_home: dict[str, int] = {}       # moved device -> the partition its old snapshot is on
        # restored copy placed on its old partition (held here too) -> the partition the copy lies on:
        # deleted there too when the device is forgotten, or it would be restored again at every restore
        self._copy_home: dict[str, int] = {}
        self._topic_partitions = 0                # the input topic's partitions at the last assignment
        self._left: set[str] = set()              # restored devices whose old partition's copy is due for deletion
        self._old_copy_due: dict[str, int] = {}   # moved devices written since the last flush -> partition written
        self._untouched: set[str] = set()         # restored devices no reading has reached since
        self._last_seen: dict[str, float] = {}    # device -> monotonic time of its newest record here
        self._newest_seen = self._last_idle_check = time.monotonic()  # of any record
        timeouts = [t for t in (config.detector.idle_timeout_s, config.detector.channel_idle_timeout_s) if t]
        self._idle_check_s = min([60.0] + [t / 4 for t in timeouts]) if timeouts else 0.0  # 0: no idle checks
        self._last_checkpoint = time.monotonic()
        self._lag_warned_at = -math.inf
        self._adapted_unreleased = 0  # streams adapted since memory was last handed back
        self._alarm_caveat = alarm_caveat(self.pipeline.config.scoring)
        self._broker_reachable = True
        self._waiting_on_broker = False          # outputs or state unacknowledged: connection lost or slow
        self._abandoned = False                  # a batch was given up undelivered: no more state writes
        self._restore_retry_at = 0.0             # monotonic time before which a failed restore is not retried

    # ---- health --------------------------------------------------------------
    def _loop_alive(self) -> None:
        self._last_turn = time.monotonic()

    def healthy(self) -> bool:
        return not self.stopping.is_set() and time.monotonic() - self._last_turn < self.config.metrics.healthy_after_s

    def ready(self) -> bool:
        ok = (bool(self._assigned) and not self._to_restore and self._broker_reachable
              and not self._waiting_on_broker and not self.stopping.is_set())
        self.metrics.ready.set(ok)
        return ok

    def _broker_state(self, reachable: bool) -> None:
        if reachable != self._broker_reachable:
            if reachable:
                log.info("broker reachable again")
            else:
                log.warning("broker unreachable: not ready; processing resumes when it is back")
        self._broker_reachable = reachable

    # A large checkpoint takes seconds to be acknowledged by a healthy broker: only a
    # wait this long, or a lost connection, counts as the broker being away.
    SLOW_ACK_S = 5.0
    # A stop waits this long for a reachable broker to acknowledge before giving up.
    STOP_GRACE_S = 30.0

    def _still_alive(self) -> None:
        """Called while a long restore reads: the loop is alive, not stuck.  A stop gives the
        restore up (its partitions were never resumed: nothing of them is lost), rather than
        wait out a broker gone meanwhile for kafka.delivery_timeout_ms."""
        self._last_turn = time.monotonic()
        if self.stopping.is_set():
            raise StoppedWhileWaiting

    def _on_broker_wait(self, seconds: float) -> None:
        """Called about every second while a flush waits for the broker: the loop is alive."""
        self._last_turn = time.monotonic()
        unreachable = self.source is not None and not self.source.connected()
        if self.stopping.is_set() and (unreachable or seconds >= self.STOP_GRACE_S):
            raise StoppedWhileWaiting
        if not (unreachable or seconds >= self.SLOW_ACK_S):
            return
        if not self._waiting_on_broker:
            log.warning("waiting for the broker to acknowledge outputs; not ready, nothing is committed meanwhile",
                        extra=_fields(seconds=round(seconds, 1), broker_connected=not unreachable,
                                      delivery_timeout_ms=self.config.kafka.delivery_timeout_ms))
        self._waiting_on_broker = True
        self.ready()

    def stop(self, signum: int | None = None, _frame=None) -> None:
        """Stop; as a signal handler, ``signum`` is kept in ``stopped_by``."""
        if signum is not None and self.stopped_by is None:
            self.stopped_by = signum
        if not self.stopping.is_set():
            log.info("stopping: finishing the current batch" if self._looping else "stopping: ending the start-up")
        self.stopping.set()

    # ---- rebalancing ------------------------------------------------------------
    def _on_revoke(self, partitions, lost: bool = False) -> None:
        partitions = set(partitions)
        leaving = {tp.partition for tp in partitions}
        gone = {d for d, p in self._partition_of.items() if p in leaving}
        if self.store is not None and not lost and not self._abandoned:
            self._save_on_revoke(gone)
        if self._round is not None:  # its offsets are committed later, for the partitions still held
            for tp in partitions:
                self._round.offsets.pop(tp, None)
        for tp in partitions:
            self._pending.pop(tp, None)
            self._processed.pop(tp.partition, None)
            self._bad_handled.pop(tp.partition, None)
        self._to_restore -= partitions
        dropped = self._drop_devices(gone)
        self._assigned -= partitions  # first: the loop sets lag only for partitions held
        for tp in partitions:
            try:
                self.metrics.lag.remove(tp.topic, str(tp.partition))
            except KeyError:  # never exported
                pass
        if partitions or gone:  # kafka-python revokes nothing before the first join
            log.info("partitions lost" if lost else "partitions revoked",
                     extra=_fields(partitions=sorted(tp.partition for tp in partitions),
                                   devices_dropped=len(gone), streams_dropped=dropped))

    def _drop_devices(self, devices: set[str]) -> int:
        """Forget these devices here (pipeline, score series, bookkeeping); returns streams dropped."""
        if self._round is not None:
            self._round.todo = [d for d in self._round.todo if d not in devices]
        for device in devices:
            self._partition_of.pop(device, None)
            self._covered.pop(device, None)
            self._seen_until.pop(device, None)
            self._last_seen.pop(device, None)
            self._old_home.pop(device, None)
            self._copy_home.pop(device, None)
            self._old_copy_due.pop(device, None)
            self._left.discard(device)
            self._untouched.discard(device)
        self.metrics.forget_devices(devices)
        dropped = self.pipeline.drop_devices(devices)
        # now, not at the next batch: a member left without partitions gets none, and fleet
        # sums of forewarn_streams would count its old streams twice
        self.metrics.set_streams(self.pipeline.streams_by_state())
        return dropped

    def _forget_idle(self, idle_timeout_s: float) -> None:
        """Devices without a record for ``idle_timeout_s`` are forgotten, their saved state
        deleted: a fleet that replaces devices would otherwise grow without bound, towards
        ``detector.max_streams``.  One that returns warms afresh.  Idle is measured against
        the newest record of any device, so that while nothing arrives at all (the broker or
        the producers away, or the partitions paused) nothing is forgotten (0: never).  The
        channels a device stopped sending go too, after ``detector.channel_idle_timeout_s``."""
        self._last_idle_check = time.monotonic()
        quiet = self.pipeline.drop_quiet_channels()  # their devices are rewritten at the next checkpoint
        if quiet:
            self.metrics.channels_forgotten.inc(sum(quiet.values()))
            self.metrics.set_streams(self.pipeline.streams_by_state())
            log.info("quiet channels forgotten", extra=_fields(
                devices=len(quiet), channels=sum(quiet.values()), examples=sorted(quiet)[:5],
                channel_idle_timeout_s=self.config.detector.channel_idle_timeout_s))
        if not idle_timeout_s:
            return
        idle = {d for d, seen in self._last_seen.items() if self._newest_seen - seen >= idle_timeout_s}
        if not idle:
            return
        if self.store is not None and not self._abandoned:
            if not _in_group(self.source):  # its tombstones would delete the new owner's snapshots
                self._note_out_of_group()
                return
            try:
                for device in idle:
                    homes = {self._partition_of.get(device), self._old_home.get(device), self._old_copy_due.get(device),
                             self._copy_home.get(device)}
                    for home in homes - {None}:
                        self.store.delete(home, device)
            except KafkaTimeoutError:  # no room in the producer's buffer: forgotten at a later check
                self._on_broker_wait(self.SLOW_ACK_S)
                return
            if self._waiting_on_broker and self._round is None:
                # set by an earlier check's full buffer, and nothing else waits: no flush may come to
                # clear it while no input arrives, and /readyz would stay 503 with the broker back
                self._waiting_on_broker = False
        streams = self._drop_devices(idle)
        self.metrics.forgotten.inc(len(idle))
        log.info("idle devices forgotten", extra=_fields(devices=len(idle), streams=streams,
                                                        examples=sorted(idle)[:5], idle_timeout_s=idle_timeout_s))

    def _save_on_revoke(self, devices: set[str]) -> None:
        """Write the latest state of the departing devices, so their next owner continues
        where they stand (no commit is possible inside a rebalance; the next owner skips
        what the states cover).  This runs on the consumer's IO thread, heartbeats
        waiting, so it stops after half the session timeout: a device not written
        restores from its last checkpoint and replays from the committed offset.  Not
        after a batch was given up mid-way: its devices have learned readings whose
        outputs were not delivered, and the last checkpoint is the consistent state."""
        if self.source is not None and not self.source.session_alive():
            # dropped while busy or paused, and only now rejoining (or closing): the partitions'
            # new owner may have checkpointed since, and these states would land after its own
            self._note_out_of_group()
            return
        deadline = time.monotonic() + self.config.kafka.session_timeout_ms / 2000
        unwritten = set(self._round.todo) & devices if self._round else set()
        todo = list(unwritten | self.pipeline.take_changed(devices))
        step = self.config.state.checkpoint_batch
        written, flushed = 0, False
        try:
            while todo and time.monotonic() < deadline:
                chunk, todo = todo[:step], todo[step:]
                written += self._write_states(chunk)
            if not todo:  # then, with the time left, the copies for a grown topic
                moves = list(self._moved_by_growth(devices, deadline).items())
                while moves and time.monotonic() < deadline:
                    chunk, moves = moves[:step], moves[step:]
                    self._write_copies(dict(chunk))
                if moves:
                    log.warning("state copies for the grown topic cut short by the revoke's time; those "
                                "devices re-warm where they now arrive", extra=_fields(not_copied=len(moves)))
            self._flushed(self.store, give_up_at=deadline + 1.0)
            flushed = True
            if self._old_copy_due:  # their new snapshots are in: now the old copies' tombstones
                self._delete_old_copies()
                self._flushed(self.store, give_up_at=deadline + 1.0)
        except _RevokeDeadline:
            if flushed:  # only tombstones were left: their stale copies go when idle, or are outdated
                log.warning("tombstones of moved devices' old snapshots not acknowledged on revoke; a restore "
                            "takes the newer snapshot", extra=_fields(written=written))
                return
            # The writes may still land, even after the next owner's first checkpoint: a later
            # restore may then take this older state.  No reading is skipped unseen (a snapshot
            # skips only what it covers) and none is lost; the state is a little behind.
            log.warning("state write on revoke not acknowledged within half the session timeout; the "
                        "next owner restores from the last checkpoint", extra=_fields(written=written))
            return
        except StoppedWhileWaiting:
            log.warning("state write on revoke given up: stopping while the broker is away")
            return
        except Exception:  # the next owner replays from the last checkpoint instead
            log.warning("state write on revoke failed", exc_info=True)
            return
        if todo:
            log.warning("state write on revoke cut short; the rest restore from their last checkpoint (and if "
                        "the input topic has grown, the devices whose key moved re-warm where they arrive)",
                        extra=_fields(written=written, not_written=len(todo)))

    def _moved_by_growth(self, devices: set[str], deadline: float) -> dict[str, int]:
        """The devices whose key the input topic's growth moves to another partition, with that
        partition: a copy of their state is written there (``_write_copies``), where whoever is
        assigned it next restores it.  A rebalance follows every growth, and all members write
        their states before any restores (kafka-python's rebalances revoke every partition
        first), so the copy is in place in time.  A copy, not a move: producers learn of the
        new partitions on their own metadata refresh, before or after this rebalance, and until
        then a device's readings still arrive on its old partition, whose next owner continues
        it from the old snapshot."""
        before, partitioner = self._topic_partitions, self.config.kafka.producer_partitioner
        if not devices or not before or partitioner == "none" or self.source is None:
            return {}
        if not self.source.connected():
            log.debug("broker unreachable on revoke: the input topic's partitions not counted")
            return {}
        try:
            after = self.source.partitions_now(timeout_ms=_ms_left(deadline, 2000))
        except Exception as exc:  # noqa: BLE001  if it grew, moved devices re-warm where they arrive
            log.warning("the input topic's partitions could not be counted on revoke; if it has grown, the "
                        "devices whose key moved re-warm where they arrive",
                        extra=_fields(error=error_text(exc)))
            return {}
        if after <= before:
            return {}
        placed = {d: self._partition_of[d] for d in devices if d in self._partition_of}
        # devices restored here that nothing has reached since may be copies a device left behind
        # at an earlier growth, where no partitioner puts them: not evidence of the producers'
        judged = set(placed) - self._untouched or None
        found, moves, explained = moved_by_growth(placed, before, after, partitioner, judged)
        if found in ("unknown", "ambiguous"):
            log.warning("the input topic grew, but how its producers place device keys cannot be told "
                        "(kafka.producer_partitioner = auto): the devices whose key moved re-warm where they "
                        "arrive; set it to murmur2 (Java, kafka-python) or crc32 (librdkafka) to move their state",
                        extra=_fields(partitions_before=before, partitions_after=after, devices=len(placed),
                                      placement=found))
            return {}
        if explained < 0.95:  # named in the settings, yet not where it would put them
            log.warning("kafka.producer_partitioner does not put most of this member's devices where they are: "
                        "their state may be copied to partitions they never arrive on", extra=_fields(
                            partitioner=found, explained=round(explained, 3), devices=len(placed)))
        if moves:
            try:  # the copies for the new partitions go to their changelog partitions
                self.store.ensure_partitions(after, deadline)
            except Exception as exc:  # noqa: BLE001
                log.warning("the input topic grew, but the changelog could not follow in time: the devices "
                            "whose key moved re-warm where they arrive", extra=_fields(
                                partitions_after=after, error=error_text(exc)))
                return {}
        self._topic_partitions = after
        log.info("the input topic grew: the state of the devices whose key moved is copied to their new "
                 "partitions", extra=_fields(partitions_before=before, partitions_after=after,
                                            partitioner=found, devices_moved=len(moves), devices=len(placed)))
        return moves

    def _on_assign(self, partitions) -> None:
        self._assigned = set(partitions)
        if self.store is not None and partitions:
            self.source.pause(partitions)  # until their devices are restored, in the loop
            self._to_restore |= set(partitions)
        log.info("partitions assigned", extra=_fields(partitions=sorted(tp.partition for tp in partitions)))

    def _prime(self) -> int:
        """Adapt and score one made-up stream on a pipeline of its own before joining the group.

        torch's first adaptation in a process costs a second or more of one-off set-up (seen
        at 4.8 s on a busy machine), and a batch that outlasts kafka.max_poll_interval_ms loses
        the partitions it came from: the demo's 3 s lost them, re-delivered and re-scored its
        first batches, and re-warmed its device.  Returns the streams adapted (1)."""
        started = time.perf_counter()
        scratch = Pipeline(self.init, replace(self.pipeline.config, max_streams=1))
        n = self.pipeline.config.warmup + 2
        adapted = scratch.feed([Reading("prime", float(t), {"x": math.sin(t / 8)}) for t in range(n)]).adapted
        log.info("torch primed", extra=_fields(seconds=round(time.perf_counter() - started, 3)))
        return adapted

    def processed_offsets(self) -> dict[int, int]:
        """Partition -> the next offset whose records before it are processed and their outputs
        delivered, for the partitions this instance holds (safe to read from another thread)."""
        return dict(self._processed)

    # ---- the loop -----------------------------------------------------------------
    # While the start-up waits for the brokers, a warning this often: kafka-python's clients
    # wait up to 30 s each, silently, for a broker that may never answer.
    STARTUP_WARN_S = 10.0

    def run(self) -> int:
        cfg = self.config
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        self.server = HealthServer(cfg.metrics.host, cfg.metrics.port, self.registry, self.healthy, self.ready)
        self.server.start()
        log.info("serving metrics", extra=_fields(host=cfg.metrics.host, port=self.server.port, path="/metrics"))
        if cfg.state.store != "none" and cfg.state.checkpoint_interval_s >= STALLED_CHECKPOINTS_ALERT_S:
            log.warning("state.checkpoint_interval_s is 15 minutes or more: the ForewarnCheckpointsStalled alert "
                        "(no checkpoint in 15 minutes) will fire, and a crash replays that much",
                        extra=_fields(checkpoint_interval_s=cfg.state.checkpoint_interval_s))
        source = sinks = startup = None
        try:
            startup = _StartUp(self._connect)
            if not self.stopping.is_set():
                self._prime()  # meanwhile the clients connect
            started = self._started(startup)
            self.store, source, sinks = startup.handed_over()
            if not started:
                log.info("stopped before starting: the start-up was given up, nothing was consumed or committed",
                         extra=_fields(waiting_for=startup.step,
                                       closing=sorted(k for k, v in startup.opened.items() if v is not None)))
                return 0
            self.source = source
            self._looping = True
            self._loop(source, sinks)
            if (self._pending or self._round) and self._broker_reachable:
                self._checkpoint_now(source)
        except StoppedWhileWaiting:
            self._abandoned = True
            log.warning("stopped while waiting for the broker: the readings since the last checkpoint "
                        "are not committed and will be processed again")
        except BaseException as exc:  # whatever it was, the batch in hand is given up undelivered
            self._abandoned = True
            if self._batch_started or self._pending or self._round:
                log.error("exiting on an error: the batch in hand is not committed and its devices' state is not "
                          "saved, so a restart replays it from the last checkpoint",
                          extra=_fields(error=error_text(exc)))
            else:  # nothing processed yet: a start-up failure (configuration, broker, state file)
                log.error("exiting on an error before any batch was processed",
                          extra=_fields(error=error_text(exc)))
            raise
        finally:
            if startup is not None:  # whatever it opened, finished or not (left on an error in priming, say)
                startup.give_up()
                self.store, source, sinks = startup.handed_over()
            log.info("closing consumer and producer")
            try:
                if source is not None:
                    source.close()  # first: leaving the group revokes, which writes states to the store
            finally:
                try:
                    if self.store is not None:
                        self.store.close()
                finally:
                    if sinks is not None:
                        sinks.close()
                    self.server.stop()
        log.info("stopped", extra=_fields(batches=self.batches, **{k: v for k, v in self.pipeline.counts.items()}))
        return 0

    def _connect(self, startup: _StartUp) -> None:
        """The blocking part of the start-up, on ``startup``'s thread: each client's constructor
        waits for the brokers (kafka-python's bootstrap, 30 s), and the topics are looked up."""
        from connectors.kafka import KafkaSinks, KafkaSource

        cfg = self.config
        log.info("connecting to the brokers: a stop now ends the start-up",
                 extra=_fields(bootstrap=cfg.kafka.bootstrap_servers))
        # first: a local state file that cannot be opened fails at once
        startup.keep("store", "the state store", self._open_store)
        source = startup.keep("source", "the consumer", lambda: KafkaSource(
            cfg.kafka, on_revoke=self._on_revoke, on_assign=self._on_assign))
        sinks = startup.keep("sinks", "the output producer", lambda: KafkaSinks(cfg.kafka))
        startup.at("the output topics")
        created = sinks.ensure_topics()
        if created:
            log.info("created output topics", extra=_fields(topics=created))
        startup.at("the input topic")  # given up meanwhile: not "consuming"
        log.info("consuming", extra=_fields(topic=cfg.kafka.topic, group=cfg.kafka.group_id,
                                            bootstrap=cfg.kafka.bootstrap_servers,
                                            init=self.init.info.get("algorithm", "?")))
        self._check_input_topic(source)

    def _started(self, startup: _StartUp) -> bool:
        """Wait for the start-up to finish (raising what it failed of), or for a stop: False
        then, the start-up given up, its clients opened so far in ``startup.opened``."""
        began = warned = time.monotonic()
        while not startup.done.wait(0.1):
            if self.stopping.is_set():
                return not startup.give_up()
            if time.monotonic() - warned >= self.STARTUP_WARN_S:
                warned = time.monotonic()
                log.warning("still starting: waiting for the brokers (not ready meanwhile; a stop ends the "
                            "start-up at once)", extra=_fields(waiting_for=startup.step,
                                                              seconds=round(warned - began, 1),
                                                              bootstrap=self.config.kafka.bootstrap_servers))
        if startup.error is not None:
            raise startup.error
        return True

    def _check_input_topic(self, source) -> None:
        """Say at once when the input topic is missing: the group then waits, with nothing
        assigned and not ready, which otherwise shows only as a silent daemon."""
        try:
            partitions = source.partitions_now()
        except UnknownTopicOrPartitionError:
            log.warning("the input topic does not exist: until it does the daemon has no partitions and is not "
                        "ready. A broker that creates topics on request makes it now, with its default partition "
                        "count; otherwise create it, or set kafka.topic to the right one",
                        extra=_fields(topic=self.config.kafka.topic))
        except KafkaError as exc:  # not authorized to describe it, the broker slow: the loop says more
            log.debug("input topic not described", extra=_fields(error=error_text(exc)))
        else:
            log.info("input topic", extra=_fields(topic=self.config.kafka.topic, partitions=partitions))

    def _loop(self, source, sinks) -> None:
        interval = self.config.state.checkpoint_interval_s
        last_lag = 0.0
        while not self.stopping.is_set():
            batch = source.poll()
            self._last_turn = time.monotonic()
            self._note_unassigned(self._last_turn)
            self._broker_state(source.connected())
            self.ready()  # keeps forewarn_ready current without a /readyz request
            if batch.records:
                self._process(batch, source, sinks)
            else:
                self._release_after_burst(0)  # a burst that ended as the input went quiet
            if not self._broker_reachable:
                continue  # restores, commits and lag queries would only block until it is back
            if self._to_restore:
                self._restore(source)
            if self._round is None and self._pending and time.monotonic() - self._last_checkpoint >= interval:
                self._round = self._begin_round()
            if self._round is not None:
                self._advance_round(source, self.config.state.checkpoint_batch)
            if time.monotonic() - last_lag > (5.0 if batch.records else 1.0):
                self._update_lag(source)
                last_lag = time.monotonic()
            if self._idle_check_s and time.monotonic() - self._last_idle_check >= self._idle_check_s:
                self._forget_idle(self.config.detector.idle_timeout_s)

    UNASSIGNED_LOG_S = 30.0

    def _note_unassigned(self, now: float) -> None:
        """Say so while this member holds no partition: 30 s in, then at doubling intervals up
        to 10 minutes.  A join can take the rebalance timeout (kafka.max_poll_interval_ms), and
        without a word a slow join, or a group that never assigns, looks like a hung daemon."""
        if self._assigned:
            self._unassigned_since = None
            return
        if self._unassigned_since is None:
            self._unassigned_since = self._unassigned_said = now
            return
        waited, since_said = now - self._unassigned_since, now - self._unassigned_said
        if since_said >= min(600.0, max(self.UNASSIGNED_LOG_S, waited / 2)):
            self._unassigned_said = now
            log.info("no partitions assigned yet: waiting for the consumer group (a join takes up to "
                     "kafka.max_poll_interval_ms; a member beyond the topic's partition count stays idle)",
                     extra=_fields(group=self.config.kafka.group_id, topic=self.config.kafka.topic,
                                   seconds=round(waited), max_poll_interval_ms=self.config.kafka.max_poll_interval_ms))

    def _process(self, batch, source, sinks) -> None:
        self._batch_started = True
        self._note_moves(batch.partition_of, batch.split)
        self._partition_of.update(batch.partition_of)
        if self._untouched:
            self._untouched.difference_update(batch.partition_of)
        self._newest_seen = time.monotonic()
        self._last_seen.update(dict.fromkeys(batch.partition_of, self._newest_seen))
        readings = self._skip_covered(batch) if self._covered or self._seen_until else batch.readings
        result = self.pipeline.feed(readings)
        self._tell_alarm_caveat()
        parsed_bad = self._skip_handled_bad(batch.bad) if self._bad_handled else batch.bad
        bad = parsed_bad + batch.with_raw(result.bad)
        sent = sinks.send_scores(result.scores)
        sinks.send_dead_letters(bad, batch.key_of)
        self._flushed(sinks)  # raises if the broker did not take them: then nothing is committed
        self._observe_latency(batch, readings)
        self._pending.update(batch.offsets)
        for tp, offset in batch.offsets.items():
            self._processed[tp.partition] = offset
            if self._bad_handled.get(tp.partition, math.inf) <= offset:  # past it: all is new
                self._bad_handled.pop(tp.partition, None)
        if self.store is None or self.config.state.checkpoint_interval_s == 0:
            self._checkpoint_now(source)
        self.batches += 1
        self.records += batch.records
        self.metrics.observe_scores(result.scores)
        self.metrics.observe_bad(b.reason for b in bad)
        self.metrics.set_streams(self.pipeline.streams_by_state())
        if result.adapted:
            self.metrics.adaptation.observe(result.adapt_seconds)
            self.metrics.adapted.inc(result.adapted)
            log.info("streams adapted", extra=_fields(streams=result.adapted, seconds=round(result.adapt_seconds, 3)))
        if result.readapted:
            self.metrics.readapted.inc(result.readapted)
            log.info("drifted streams re-adapted", extra=_fields(streams=result.readapted))
        if result.updated:
            self.metrics.updated.inc(result.updated)
        self._release_after_burst(result.adapted + result.readapted)
        for b in bad[:5]:
            log.warning("bad record", extra=_fields(reason=b.reason.value, detail=b.detail, source=b.ref))
        if self.on_result:
            self.on_result(result)
        log.debug("batch", extra=_fields(records=batch.records, anomalies_sent=sent, bad=len(bad)))

    MOVES_LOG_INTERVAL_S = 60.0

    def _note_moves(self, partition_of: dict[str, int], split: dict[str, int] | None = None) -> None:
        """Count devices arriving on another partition than before, or on two in one batch
        (``split``: device -> the other).  Once, when the input topic grows, it is expected; all
        the time, producers are not keying by device (a null key spreads a device over every
        partition): a device's readings then race each other across partitions (out-of-order
        records) and its state is checkpointed against offsets of a partition it does not stay on."""
        known = self._partition_of
        moved = [d for d, p in partition_of.items() if known.get(d, p) != p]
        if not moved and not split:
            return
        if self.store is not None:
            # its snapshot lies on the partition it was last saved on or restored from (the
            # first it left since): deleted there when its first new one is written
            for device in moved:
                self._old_home.setdefault(device, known[device])
        # a device on both partitions of every batch ends each on the same one: counted as split
        before = {**(split or {}), **{d: known[d] for d in moved}}
        self.metrics.partition_moves.inc(len(before))
        now = time.monotonic()
        if now - self._moves_logged >= self.MOVES_LOG_INTERVAL_S:
            self._moves_logged = now
            example = next(iter(before))
            log.warning("devices arrived on another partition than before, or on two at once: is the input "
                        "keyed by device?", extra=_fields(devices=len(before), example=example,
                                                         partitions=[before[example], partition_of[example]]))

    def _skip_handled_bad(self, bad: list) -> list:
        """Drop re-delivered bad records that the partition's previous owner already counted and
        dead-lettered: those before the newest offset its restored states cover, since a
        partition is processed in order.  Readings have ``_skip_covered``."""
        kept = []
        for b in bad:
            at = parse_ref(b.ref)
            if at is None or at[2] >= self._bad_handled.get(at[1], -1):
                kept.append(b)
        return kept

    def _skip_covered(self, batch) -> list:
        """Drop re-delivered readings that a restored state already covers: those of its own
        partition before its offset, or, on a partition taken for remade, those no newer than
        its state.  A device whose key moved (the input topic grew) may arrive on two
        partitions at once; the other partition's readings are not covered."""
        kept, skipped = [], 0
        covered, offset_of, seen_until = self._covered, batch.offset_of, self._seen_until
        for r in batch.readings:
            until = seen_until.get(r.device)
            if until is not None:
                if r.ts <= until:
                    skipped += 1
                    continue
                del seen_until[r.device]  # newer than its state: the rest is new
            covered_at = covered.get(r.device)
            if covered_at is not None:
                partition, offset = offset_of.get(id(r), (None, -1))
                if partition == covered_at[0]:
                    if offset < covered_at[1]:
                        skipped += 1
                        continue
                    del covered[r.device]  # past what its state covers
                elif r.device not in self._left:  # its snapshot lies on a partition it no longer arrives
                    self._left.add(r.device)       # on: deleted there at its next write, once
                    self._old_home[r.device] = covered_at[0]
            kept.append(r)
        if skipped:
            self.metrics.redelivered.inc(skipped)
        return kept

    # ---- state -----------------------------------------------------------------
    def _open_store(self):
        from connectors.state_store import ChangelogStore, LocalStore
        st = self.config.state
        if st.store == "none":
            return None
        if st.store == "local":
            log.info("state store: local file", extra=_fields(path=st.local_path))
            return LocalStore(st.local_path)
        topic = self.config.changelog_topic()
        log.info("state store: changelog", extra=_fields(topic=topic))
        return ChangelogStore(self.config.kafka, topic, st.changelog_replication, st.max_snapshot_bytes)

    def _export(self, devices: list[str]) -> list:
        """The states of these devices, each naming the input offset it covers: everything
        processed on its partition so far."""
        partition_of, processed, restored, seen_until = self._partition_of, self._processed, self._covered, \
            self._seen_until
        # a restored device nothing new has reached yet still covers what its snapshot did; one
        # restored covering no offset, nothing newer than its state read yet, still covers none:
        # readings past the offset read so far may be older than its state, and a next owner
        # told that offset would take them for new ones and reject them as out of order
        covered = {d: -1 if d in seen_until else
                   max(processed.get(partition_of[d], -1), _offset_on(restored.get(d), partition_of[d]))
                   for d in devices}
        states = self.pipeline.export_devices(devices, covered)
        wall_minus_mono = time.time() - time.monotonic()
        for state in states:
            seen = self._last_seen.get(state.device)
            if seen is not None:
                state.seen = seen + wall_minus_mono
        return states

    def _write_states(self, devices) -> int:
        """Snapshots of these devices to the store (not yet flushed)."""
        partition_of = self._partition_of
        devices = [d for d in devices if d in partition_of]
        states = self._export(devices)
        for state, data in zip(states, self.codec.encode_many(states)):
            self._put(partition_of[state.device], state.device, data)
        self._old_copy_due.update((d, partition_of[d]) for d in devices if d in self._old_home)
        self._note_dropped()
        return len(devices)

    def _delete_old_copies(self) -> None:
        """Tombstones for the old partition's copy of the devices whose snapshot on their new
        partition the store has just acknowledged: sent with the new snapshot, a crash between
        the two acknowledgements could leave the device no snapshot at all.  They go out with
        the next flush; until then a restore takes the newer of the two copies."""
        for device, written in list(self._old_copy_due.items()):
            old_home = self._old_home.get(device)
            if old_home is not None and old_home != written:
                try:
                    self.store.delete(old_home, device)
                except KafkaTimeoutError:  # no room in the producer's buffer: sent after a later flush
                    return
            if self._partition_of.get(device, written) != written:
                self._old_home[device] = written  # moved again since: the copy just written is the old one
            else:
                self._old_home.pop(device, None)
            del self._old_copy_due[device]

    def _write_copies(self, moves: dict[str, int]) -> None:
        """A copy of each device's state to the partition the topic's growth moves it to,
        covering its old partition's offsets (``DeviceState.moved_from``)."""
        states = [replace(s, offset=-1, moved_from=(self._partition_of[s.device], s.offset))
                  for s in self._export(list(moves))]
        for state, data in zip(states, self.codec.encode_many(states)):
            self._put(moves[state.device], state.device, data)
        self._note_dropped()

    def _put(self, partition: int, device: str, data: bytes | None) -> None:
        """A snapshot to the store; for one the codec could not encode (None), a tombstone in
        its place, so that no older snapshot of the device is restored either."""
        if data is not None:
            self.store.put(partition, device, data)
            return
        self.store.delete(partition, device)
        self._not_saved(device, "device state holds a number that is not finite: not saved, the device "
                                "re-warms after a restart")

    def _note_dropped(self) -> None:
        """Count and log the snapshots the store found too large."""
        for device, size in self.store.take_dropped():
            self._not_saved(device, "device snapshot too large for the changelog (state.max_snapshot_bytes, or "
                                    "the topic's max.message.bytes): not saved, the device re-warms after a "
                                    "restart", bytes=size)

    def _not_saved(self, device: str, message: str, **fields) -> None:
        """Count a snapshot not saved; log it once per device."""
        self.metrics.snapshots_dropped.inc()
        if device not in self._unsaved:
            self._unsaved.add(device)
            log.error(message, extra=_fields(device=device, **fields))

    def _flushed(self, sink, give_up_at: float | None = None) -> None:
        """Wait for the broker to acknowledge what ``sink`` holds (past ``give_up_at``,
        a monotonic time, raise ``_RevokeDeadline``)."""
        def on_wait(seconds: float) -> None:
            self._on_broker_wait(seconds)
            if give_up_at is not None and time.monotonic() > give_up_at:
                raise _RevokeDeadline

        try:
            sink.flush(on_wait=on_wait)
            if sink is self.store:
                self._note_dropped()  # refused by the broker while flushing
        except Exception:
            self._waiting_on_broker = False  # what follows is an exit or a caught failure, not a wait
            raise
        if self._waiting_on_broker:
            log.info("broker acknowledged the outputs it was holding")
            self._waiting_on_broker = False

    def _begin_round(self) -> _CheckpointRound:
        offsets, self._pending = self._pending, {}
        todo = list(self.pipeline.take_changed()) if self.store is not None else []
        return _CheckpointRound(offsets, todo)

    def _advance_round(self, source, limit: int | None) -> None:
        """Write the next ``limit`` devices of the round (all if None); when none are
        left, make them durable and commit the round's offsets."""
        round_ = self._round
        if self.store is not None and not _in_group(source):
            # dropped from the group (a batch past the rebalance timeout, a paused process): the
            # partitions' new owner may have checkpointed already, and these older snapshots would
            # land after its own and be restored. The round waits for the next poll, whose
            # rebalance takes the departed partitions out of it.
            self._note_out_of_group()
            return
        if round_.todo:
            chunk = round_.todo[:limit]  # a copy, also of the whole (None): the todo is cut below
            del round_.todo[:len(chunk)]
            try:
                round_.written += self._write_states(chunk)
            except KafkaTimeoutError:  # no room in the producer's buffer: the broker is away or slow
                round_.todo[:0] = chunk  # written again on a later turn (a snapshot written twice is harmless)
                self._on_broker_wait(self.SLOW_ACK_S)  # not ready, said once; a stop gives up here
                return
            if round_.todo:
                return
        if self.store is not None:
            self._flushed(self.store)
            self._delete_old_copies()
        self._round = None
        if not round_.offsets:  # a revoke took every partition it was for: nothing committed, no checkpoint
            return
        self._last_checkpoint = time.monotonic()
        try:
            source.commit(round_.offsets)
        except CommitFailedError as exc:  # kicked out of the group: the next owner replays from the last commit
            self.metrics.commit_failures.inc()
            log.warning("offset commit refused; readings will be re-delivered", extra=_fields(error=str(exc)))
            return  # not a checkpoint: what it covers is processed again
        except KafkaError as exc:
            if not exc.retriable:
                raise
            self.metrics.commit_failures.inc()  # the broker went away mid-commit: the next checkpoint retries
            log.warning("offset commit failed; retried at the next checkpoint", extra=_fields(error=str(exc)))
            self._pending = {**round_.offsets, **self._pending}
            return
        if self.store is not None:
            self.metrics.checkpoints.inc()
            self.metrics.checkpoint_duration.observe(time.perf_counter() - round_.started)
            log.debug("checkpoint", extra=_fields(devices_written=round_.written))

    def _note_out_of_group(self) -> None:
        now = time.monotonic()
        if now - self._out_of_group_logged >= 60.0:
            self._out_of_group_logged = now
            log.warning("this member is rebalancing or out of the consumer group (a batch or a pause past "
                        "kafka.max_poll_interval_ms or the session timeout drops it): device state is written "
                        "once the next poll has rejoined")

    def _checkpoint_now(self, source) -> None:
        """Finish any round in progress, then checkpoint everything processed since."""
        if self._round is not None:
            self._advance_round(source, None)
            if self._round is not None:
                # its writes found no room (the broker slow or away): it stays, to be finished
                # first. A new round would commit offsets past the devices it has not written,
                # which were taken from the changed set when it began.
                return
        if self._pending:
            self._round = self._begin_round()
            self._advance_round(source, None)

    RESTORE_RETRY_S = 5.0

    def _count_partitions(self, source) -> tuple[int, bool]:
        """The input topic's partitions, and whether the broker said so.  The consumer's own
        count may be minutes old, and one too low would make the next revoke take a growth
        for new and copy old states over live ones: it is not trusted for that."""
        try:
            return source.partitions_now(), True
        except KafkaError as exc:  # the broker slow, or not letting this member describe the topic
            log.warning("the input topic's partitions not counted by the broker: the next rebalance does not "
                        "look for a growth of it", extra=_fields(error=error_text(exc)))
            return source.partitions_for_topic(), False

    def _restore(self, source) -> None:
        """Restore the devices of newly assigned partitions; while the broker is away, leave
        them paused and try again a little later."""
        if time.monotonic() < self._restore_retry_at:
            return
        try:
            self._restore_partitions(source)
        except StoppedWhileWaiting:  # a stop: these partitions stay paused, the others stop as usual
            log.info("state restore given up: stopping; its partitions were never resumed")
        except KafkaError as exc:
            if not exc.retriable:
                raise
            self._restore_retry_at = time.monotonic() + self.RESTORE_RETRY_S
            log.warning("state restore failed, the broker away or slow; the partitions stay paused and the "
                        "restore is tried again", extra=_fields(error=error_text(exc),
                                                                retry_in_s=self.RESTORE_RETRY_S))

    def _restore_partitions(self, source) -> None:
        partitions = set(self._to_restore)
        for tp in partitions:  # marks of an earlier holding, or of a copy: made afresh below
            self._bad_handled.pop(tp.partition, None)
        started = time.perf_counter()
        # a partition that stayed here through the rebalance kept its fetch position: back to
        # the committed offset, so that devices not saved on revoke replay what their last
        # checkpoint does not cover (what a state does cover is skipped: ``_skip_covered``)
        committed_at = source.rewind(partitions)
        # the input topic may have grown since the changelog was made; its partitions must follow
        counted, trusted = self._count_partitions(source)
        total = max([counted] + [tp.partition + 1 for tp in partitions])
        self._topic_partitions = total if trusted else 0
        self.store.ensure_partitions(total)
        if not self.store.shared and len(self._assigned) < total:
            log.error("state.store = local keeps device state in this instance's file, but another member of the "
                      "group holds partitions of the topic: a device that moves between instances re-warms "
                      "there, and restores a stale snapshot when it comes back (state.store = changelog shares "
                      "it)", extra=_fields(assigned=len(self._assigned), partitions=total))
        states, failed = self._load_states(partitions)
        states = self._distrust_future(states)
        # the input partition and offset each state covers: on the partition it is stored for,
        # but for a copy handed over when the topic grew, which covers its old partition
        covers = [s.moved_from or (partition, s.offset) for partition, s in states]
        ends = self._ends_of_uncommitted(source, committed_at, covers)  # before anything is imported: may raise
        by_device = {s.device: s for _, s in states}
        streams = self.pipeline.import_devices(by_device.values())
        # a partition made again: every state on it covers offsets of the old one, not only
        # those past the new end (a device that went quiet early covers a smaller offset); any
        # state tells, one of a device left out below included
        remade = {partition for partition, offset in covers if offset > ends.get(partition, math.inf)}
        states, covers, failed = self._left_out(states, covers, failed)
        by_device = {s.device: s for _, s in states}
        self._place_restored(states, covers, remade)
        if remade:
            devices = [s.device for (_, s), (covered, _) in zip(states, covers) if covered in remade]
            # rewritten at the next checkpoint, before its commit: once the partition has a committed
            # offset, the old offsets in their snapshots would be believed again
            self.pipeline.mark_changed(devices)
            log.warning("saved states cover offsets their input partition has not reached, and it has no "
                        "committed offset: the input topic was deleted and made again, so its readings are "
                        "scored from its start, but for those no newer than a device's state has seen, skipped as "
                        "re-deliveries (an end offset the broker reports short looks the same)", extra=_fields(
                            partitions=sorted(remade), devices=len(devices),
                            end_offsets={p: ends[p] for p in sorted(remade)}))
        wall_minus_mono = time.time() - time.monotonic()
        self.metrics.restore_devices({d: self._last_seen[d] + wall_minus_mono for d, s in by_device.items()
                                      if any(stream.stage == "live" for stream in s.streams)})
        self.metrics.restored.inc(streams)
        self.metrics.restore_failures.inc(failed)
        self.metrics.set_streams(self.pipeline.streams_by_state())
        self._to_restore -= partitions
        source.resume(partitions)
        log.info("state restored", extra=_fields(partitions=sorted(tp.partition for tp in partitions),
                                                 devices=len(by_device), streams=streams, failed=failed,
                                                 seconds=round(time.perf_counter() - started, 3)))

    def _load_states(self, partitions) -> tuple[list, int]:
        """The saved states of these partitions' devices, decoded, as (partition, state); and how
        many could not be decoded (those devices re-warm)."""
        states, failed = [], 0
        for partition, device, data in self.store.load((tp.partition for tp in partitions), self._still_alive):
            try:
                states.append((partition, self.codec.decode(data)))
            except StateError as exc:
                failed += 1
                log.warning("device state not restored; it re-warms", extra=_fields(device=device, reason=str(exc)))
        return states, failed

    def _left_out(self, states: list, covers: list, failed: int) -> tuple[list, list, int]:
        """The states the pipeline took, and their covers; those it left out (past
        detector.max_streams) are logged and counted with the failures.  Their snapshots
        stay where they are (for an instance with room, should the partition move) until
        the device warms afresh here or is forgotten as idle."""
        known = self.pipeline.devices()
        out = [s.device for _, s in states if s.streams and s.device not in known]
        if not out:
            return states, covers, failed
        log.error("device states not restored: detector.max_streams reached; their readings are refused as "
                  "stream_limit, and their snapshots are left as they are until a device warms afresh here, "
                  "once there is room, or is forgotten as idle", extra=_fields(
                      devices=len(out), first=out[:5], max_streams=self.config.detector.max_streams))
        left = set(out)
        kept = [(state, cover) for state, cover in zip(states, covers) if state[1].device not in left]
        return [k[0] for k in kept], [k[1] for k in kept], failed + len(out)

    def _place_restored(self, states: list, covers: list, remade: set) -> None:
        """The daemon's bookkeeping of restored devices: the partition each is placed on, the
        input offset (or, with none to go by, the reading time) its state covers, and its idle clock."""
        now = time.monotonic()
        # the idle clock goes on from the newest record each snapshot saw, measured against the
        # newest of them (as idleness is against the newest record of any device: a fleet that
        # was down as a whole, or this instance, ages no device).  One saved ahead of this clock
        # (by an instance whose clock was fast) would age every other device by as much, and
        # have them forgotten at the first idle check: it is left out, and taken as just seen
        seen = [s.seen for _, s in states if s.seen is not None]
        latest, ahead_of = max(seen, default=None), time.time() + SEEN_AHEAD_TOLERANCE_S
        newest = max((t for t in seen if t <= ahead_of), default=latest)
        if newest is not None and newest < latest:
            log.warning("restored states saved by an instance whose clock was ahead of this one's: their devices "
                        "are taken as just seen", extra=_fields(devices=sum(t > ahead_of for t in seen),
                                                                ahead_s=round(latest - time.time(), 1)))
        held = {tp.partition for tp in self._assigned}
        for (partition, s), (covered, offset) in zip(states, covers):
            # a copy whose old partition is held here too: its readings arrive there until the
            # producers learn of the new partitions, and it is placed there, as it was
            placed = self._partition_of[s.device] = covered if s.moved_from and covered in held else partition
            if placed != partition:
                self._copy_home[s.device] = partition
            self._untouched.add(s.device)
            self._last_seen[s.device] = now - (max(0.0, newest - s.seen) if s.seen is not None else 0.0)
            if covered in remade:
                self._covered[s.device] = (covered, -1)  # nothing here; a move still deletes it there
            elif offset >= 0:
                self._covered[s.device] = (covered, offset)
                if covered in held:  # a copy's old partition held elsewhere has no records here
                    self._bad_handled[covered] = max(self._bad_handled.get(covered, -1), offset)
            if covered in remade or offset < 0:  # no offset to go by (one saved after such a restore)
                seen = [st.last_ts for st in s.streams if st.last_ts is not None]
                if seen:
                    self._seen_until[s.device] = max(seen)

    def _distrust_future(self, states: list) -> list:
        """States whose streams' newest reading is stamped past this clock plus
        kafka.max_timestamp_ahead_s (saved by a version without the limit, or under a larger one)
        restored with no newest reading: kept, every later reading of theirs would be refused
        as out of order, or skipped as already seen, until that time came."""
        limit = self.config.kafka.max_timestamp_ahead_s
        if not limit:
            return states
        latest = time.time() + limit
        out, repaired = [], []
        for partition, s in states:
            if any(st.last_ts is not None and st.last_ts > latest for st in s.streams):
                s = replace(s, streams=[replace(st, last_ts=None) if st.last_ts is not None and st.last_ts > latest
                                        else st for st in s.streams],
                            resumed=None if s.resumed is not None and s.resumed > latest else s.resumed)
                repaired.append(s.device)
            out.append((partition, s))
        if repaired:
            log.warning("restored devices whose newest reading is stamped further ahead of this clock than "
                        "kafka.max_timestamp_ahead_s: their streams take the next reading as their first",
                        extra=_fields(devices=len(repaired), first=repaired[:5]))
        return out

    @staticmethod
    def _ends_of_uncommitted(source, committed_at, covers) -> dict[int, int]:
        """End offsets of the partitions without a committed offset that states cover offsets
        on (``covers``: the (partition, offset) of each).  A partition loses its committed
        offsets when the topic is deleted (or the group idles past
        offsets.retention.minutes): made again, its offsets restart from 0, and a
        state covering offset 5,000 of the old one would silently skip its first 5,000
        readings.  An offset beyond the end tells the two apart.  A partition with a committed
        offset is the one the states were made on (deleting a topic deletes its committed
        offsets, and the states of a remade one are rewritten before its first commit), and is
        not asked: Tansu reports an end that lags within a record batch, which can make a state
        look past the end where the partition has no commit yet (offsets expired, or a member
        revoked again before its first checkpoint): its readings are then read again from the
        start, and those its devices' states have seen are skipped by timestamp."""
        uncommitted = {tp.partition: tp for tp, committed in committed_at.items() if committed is None}
        wanted = {uncommitted[p] for p, offset in covers if p in uncommitted and offset >= 0}
        if not wanted:
            return {}
        return {tp.partition: end for tp, end in source.end_offsets(wanted).items()}

    LATENCY_SAMPLES = 256

    def _observe_latency(self, batch, readings: list) -> None:
        """Latency of an evenly strided sample of at most LATENCY_SAMPLES of the batch's
        ``readings`` (those fed, not the re-deliveries skipped): a histogram observation per
        reading would cost more than scoring it."""
        now = time.time()
        stride = max(1, -(-len(readings) // self.LATENCY_SAMPLES))
        for reading in readings[::stride]:
            t = batch.arrival.get(id(reading))
            if t is not None:
                self.metrics.latency.observe(max(0.0, now - t))
        if self.latency_log is not None:
            self.latency_log.extend(now - batch.arrival[id(r)] for r in readings if id(r) in batch.arrival)

    def _tell_alarm_caveat(self) -> None:
        """Once, when a device it applies to (several channels) has come: a fleet of single
        metrics is not capped, and NAB-like settings for one would warn for nothing."""
        if self._alarm_caveat and self.pipeline.several_channels_seen:
            log.warning(self._alarm_caveat, extra=_fields(alarm_surprise=self.config.detector.alarm_surprise))
            self._alarm_caveat = None

    def _release_after_burst(self, adapted: int) -> None:
        """Hand the heap memory adaptations freed back to the system once a burst of them ends
        (a batch, or a quiet poll, adapts none after at least ``RELEASE_AFTER_STREAMS``), or
        after every ``RELEASE_EVERY_STREAMS`` in a run of batches that all adapt some.  glibc
        keeps it: after 2,000 streams adapted, 1.1 GiB stayed resident where 0.37 GiB was in
        use (benchmarks/memory.py), and a pod sized for its steady state would sit at its peak
        until restarted.  Not per batch: a burst reuses what the batch before it freed."""
        self._adapted_unreleased += adapted
        if self._adapted_unreleased < (RELEASE_EVERY_STREAMS if adapted else RELEASE_AFTER_STREAMS):
            return
        self._adapted_unreleased = 0
        seconds = release_free_memory()
        if seconds is not None:
            log.info("memory freed by adaptations handed back", extra=_fields(seconds=round(seconds, 3)))

    def _update_lag(self, source) -> None:
        try:
            for tp, lag in source.lag().items():
                # kafka-python revokes on its IO thread, and lists a revoked partition until the
                # group has settled: its series, removed on revoke, would come back frozen
                if tp in self._assigned:
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
                    if tp not in self._assigned:  # revoked meanwhile, its series removed before this set
                        self.metrics.lag.remove(tp.topic, str(tp.partition))
        except Exception as exc:  # lag is information, never a reason to stop
            log.debug("lag unavailable", exc_info=True)
            if time.monotonic() - self._lag_warned_at >= LAG_WARNING_INTERVAL_S:
                self._lag_warned_at = time.monotonic()
                log.warning("consumer lag unavailable: forewarn_consumer_lag_records keeps its last values "
                            "(logged every 10 minutes while it lasts)", extra=_fields(error=error_text(exc)))
