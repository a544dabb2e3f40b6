"""Per-device state snapshots: what a device has learned, in a few KB, without pickle.

A snapshot holds every stream (channel) of one device: its lifecycle stage and
last timestamp; while warming, the buffered values; once live, the adapted
weights, the LSTM state, the normalizer, the pending forecast and the score
statistics; with only new peaks counting, the device's recent peak surprises.
It also carries the input offset it covers, so a restore knows which
re-delivered readings it has already seen (a copy handed to the partition its
device moves to when the input topic grows covers an offset of the old one).

Encoding (version 1)::

    b"FWST" | u8 version | u32 init fingerprint | u32 crc32 of body | body = zlib(
        u32 header length | JSON header | float16 weight deltas and float32 states )

With online updates on, a live stream also carries its newest inputs (float32)
and which of them may be learned from (one bit each).  Weights are stored as
float16 *differences from the initialization* (fast
adaptation moves them little, so the rounding error is ~1e-4 of the change) and
the fingerprint ties a snapshot to the initialization it was adapted from: a
snapshot of another initialization, version or a corrupt one raises
``StateError`` and that device alone re-warms.  The zlib stream is written with
stored (level 0) blocks: float16 deltas barely compress (9.1 KB stored against
8.2 KB at level 1 for one adapted channel) and compressing doubled the encoding
time, which every checkpoint pays per device; any zlib stream decodes.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from monitor.checkpoint import Initialization

MAGIC = b"FWST"
VERSION = 1
_PREFIX = struct.Struct("<4sBII")


class StateError(ValueError):
    """A snapshot that cannot be restored: corrupt, another version, or another initialization.

    >>> from monitor.forecaster import LSTMSpec
    >>> codec = StateCodec(Initialization.random(LSTMSpec(hidden=4)))
    >>> codec.decode(b"not a snapshot at all")
    Traceback (most recent call last):
    ...
    monitor.state.StateError: state record: not a Forewarn state (bad magic)
    >>> other = StateCodec(Initialization.random(LSTMSpec(hidden=4), seed=1))
    >>> other.decode(codec.encode(DeviceState("pump-7", 0, [])))  # its weights would be meaningless here
    Traceback (most recent call last):
    ...
    monitor.state.StateError: state record: adapted from another initialization
    """


@dataclass
class StreamState:
    """One stream (channel) of a snapshot: a warming one's buffer, or a live one's model and statistics.

    >>> from monitor.forecaster import LSTMSpec
    >>> from monitor.pipeline import Pipeline, PipelineConfig
    >>> from monitor.readings import Reading
    >>> pipe = Pipeline(Initialization.random(LSTMSpec(hidden=4)), PipelineConfig(warmup=16))
    >>> _ = pipe.feed([Reading("pump", float(t), {"temp": t % 5}) for t in range(20)])
    >>> _ = pipe.feed([Reading("pump", 20.0, {"temp": 1.0, "rpm": 900.0})])  # rpm: a channel added late
    >>> temp, rpm = pipe.export_devices(["pump"])[0].streams
    >>> temp.stage, temp.params is not None, rpm.stage, rpm.buffer
    ('live', True, 'warming', [900.0])
    """

    channel: str
    stage: str                                   # "warming" or "live"
    last_ts: float | None
    buffer: list[float] | None = None            # warming only
    params: dict[str, torch.Tensor] | None = None  # live only: this stream's weights
    h: torch.Tensor | None = None                # [layers, hidden]
    c: torch.Tensor | None = None
    center: float = 0.0
    scale: float = 1.0
    forecast: float = 0.0                        # scaled forecast of the next reading
    scorer: list[float] = field(default_factory=list)  # ResidualScorer.state()
    drift: list[float] | None = None             # PageHinkley.state(), when drift re-adaptation is on
    rebuffer: list[float] | None = None          # drifted: the readings collected for its re-adaptation
    recent: torch.Tensor | None = None           # online updates on: newest scaled inputs, oldest first
    learnable: torch.Tensor | None = None        # bool, like recent: False where a reading was anomalous
    since_update: int = 0                        # readings since its weights last changed
    novelty: list[float] | None = None           # RangeNovelty.state(), when range novelty is on


@dataclass
class DeviceState:
    """A device's snapshot: every stream of it, and the input offset it covers.

    >>> from monitor.forecaster import LSTMSpec
    >>> from monitor.pipeline import Pipeline, PipelineConfig
    >>> from monitor.readings import Reading
    >>> warm = StreamState("temp", "warming", last_ts=14.0, buffer=[float(t % 5) for t in range(15)])
    >>> pipe = Pipeline(Initialization.random(LSTMSpec(hidden=4)), PipelineConfig(warmup=16))
    >>> pipe.import_devices([DeviceState("pump", 1042, [warm])])
    1
    >>> pipe.feed([Reading("pump", 15.0, {"temp": 0.0})]).adapted  # the 16th value: the warm-up resumed
    1
    """

    device: str
    offset: int                                  # next input offset of its partition this state covers
    streams: list[StreamState]
    peaks: list[float] | None = None             # NewPeaks.state() of its surprises, when only new peaks count
    # Unix time of the device's newest record where it was saved, so that a restore does not
    # restart its idle clock (detector.idle_timeout_s); None in snapshots from before it
    seen: float | None = None
    # a copy handed to the partition its device moves to when the input topic grows: the
    # (partition, offset) it covers on the old one; ``offset`` is then -1, so that a version
    # before this field replays the new partition rather than skip readings it never saw
    moved_from: tuple[int, int] | None = None
    # the device's own timestamp of the reading that ended its latest silence of
    # detector.channel_idle_timeout_s: its channels count as quiet only from then, also after a
    # restore (None: none seen, or a snapshot from before it)
    resumed: float | None = None


def fingerprint(init: Initialization) -> int:
    """A checksum of the initialization's shape and weights."""
    crc = zlib.crc32(json.dumps(init.spec.shapes(), sort_keys=True).encode())
    for name in sorted(init.params):
        crc = zlib.crc32(init.params[name].detach().to(torch.float32).numpy().tobytes(), crc)
    return crc


class StateCodec:
    """Encodes and decodes ``DeviceState`` against one initialization.

    >>> from monitor.forecaster import LSTMSpec
    >>> init = Initialization.random(LSTMSpec(hidden=4))
    >>> codec = StateCodec(init)
    >>> s = DeviceState("pump-7", 42, [StreamState("temp", "warming", 3.0, buffer=[1.0, 2.5])])
    >>> codec.decode(codec.encode(s)) == s
    True
    >>> codec.decode(b"FWST" + bytes(20))
    Traceback (most recent call last):
    ...
    monitor.state.StateError: state record: version 0, expected 1
    """

    def __init__(self, init: Initialization) -> None:
        self.init = init
        self.fingerprint = fingerprint(init)
        self._names = sorted(init.params)
        self._base = {k: init.params[k].detach().to(torch.float32) for k in self._names}
        self._layers, self._hidden = init.spec.layers, init.spec.hidden

    def encode(self, state: DeviceState) -> bytes | None:
        return self.encode_many([state])[0]

    def encode_many(self, states: list[DeviceState]) -> list[bytes | None]:
        """``encode`` for many devices, with the weight deltas of all their live
        streams computed in one tensor operation per weight.  None for a device holding
        a number that is not finite (its weights past float16's range, say): ``decode``
        would refuse it, so it re-warms after a restart rather than come back broken."""
        live = [s for state in states for s in state.streams if s.stage == "live"]
        weights = iter(())
        if live:
            n = len(live)
            delta = torch.cat([(torch.stack([s.params[k] for s in live]).to(torch.float32) - self._base[k]).reshape(n, -1)
                               for k in self._names], dim=1).to(torch.float16).numpy()
            hc = torch.stack([torch.stack([s.h, s.c]) for s in live]).to(torch.float32).numpy()
            finite = np.isfinite(delta).all(axis=1) & np.isfinite(hc.reshape(n, -1)).all(axis=1)
            weights = iter(zip(delta, hc, finite))
        out = []
        for state in states:
            header = {"device": state.device, "offset": state.offset, "streams": []}
            if state.peaks is not None:  # optional keys: records without them decode as before
                header["peaks"] = state.peaks
            if state.seen is not None:
                header["seen"] = state.seen
            if state.moved_from is not None:
                header["moved_from"] = list(state.moved_from)
            if state.resumed is not None:
                header["resumed"] = state.resumed
            blobs, usable = [], True
            for s in state.streams:
                entry = {"channel": s.channel, "stage": s.stage, "last_ts": s.last_ts}
                if s.stage == "live":
                    entry.update(center=s.center, scale=s.scale, forecast=s.forecast, scorer=s.scorer)
                    if s.drift is not None:  # optional keys: records without them decode as before
                        entry.update(drift=s.drift, rebuffer=s.rebuffer)
                    if s.novelty is not None:
                        entry["novelty"] = s.novelty
                    row_delta, row_hc, row_finite = next(weights)
                    usable = usable and bool(row_finite)
                    blobs += (row_delta.tobytes(), row_hc.tobytes())
                    if s.recent is not None:
                        entry["online"] = [len(s.recent), s.since_update]
                        blobs += (s.recent.to(torch.float32).numpy().tobytes(),
                                  np.packbits(s.learnable.numpy()).tobytes())
                else:
                    entry["buffer"] = s.buffer
                header["streams"].append(entry)
            try:
                head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
            except ValueError:  # a statistic that is not finite
                usable = False
            if not usable:
                out.append(None)
                continue
            body = zlib.compress(struct.pack("<I", len(head)) + head + b"".join(blobs), 0)
            out.append(_PREFIX.pack(MAGIC, VERSION, self.fingerprint, zlib.crc32(body)) + body)
        return out

    def decode(self, data: bytes) -> DeviceState:
        if len(data) < _PREFIX.size:
            raise StateError(f"state record: {len(data)} bytes, too short")
        magic, version, fp, crc = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise StateError("state record: not a Forewarn state (bad magic)")
        if version != VERSION:
            raise StateError(f"state record: version {version}, expected {VERSION}")
        if fp != self.fingerprint:
            raise StateError("state record: adapted from another initialization")
        body = data[_PREFIX.size:]
        if zlib.crc32(body) != crc:
            raise StateError("state record: checksum mismatch (corrupt)")
        try:
            # snapshots are written as stored blocks, which never expand: one inflating far past
            # its own size is a bomb (1 MB of it held 1 GB), refused before it takes the memory
            inflater = zlib.decompressobj()
            raw = inflater.decompress(body, 2 * len(body) + 65536)
            if inflater.unconsumed_tail:
                raise StateError(f"state record: {len(body):,} bytes that decompress to far more, "
                                 "not a snapshot")
            (n_head,) = struct.unpack_from("<I", raw)
            header = json.loads(raw[4:4 + n_head])
            return self._streams(header, memoryview(raw)[4 + n_head:])
        except StateError:
            raise
        except Exception as exc:  # a crc collision or a writer bug: still just one device to re-warm
            raise StateError(f"state record: undecodable ({exc})") from None

    def _streams(self, header: dict, blob: memoryview) -> DeviceState:
        n_params = self.init.spec.n_params
        n_state = 2 * self._layers * self._hidden
        pos = 0
        streams = []
        device, covered, channels = header["device"], header["offset"], set()
        if not isinstance(device, str) or not isinstance(covered, int) or isinstance(covered, bool) or covered < -1:
            raise StateError("state record: bad device name or offset")
        peaks = header.get("peaks")
        if peaks is not None and not (isinstance(peaks, list) and len(peaks) >= 2 and _finite_numbers(peaks)
                                      and peaks[0] >= 0):
            raise StateError("state record: bad new-peak maxima")
        seen = header.get("seen")
        if seen is not None and not _finite_numbers([seen]):
            raise StateError("state record: bad time of the newest record")
        moved_from = header.get("moved_from")
        if moved_from is not None:
            if not (isinstance(moved_from, list) and len(moved_from) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in moved_from)
                    and moved_from[0] >= 0 and moved_from[1] >= -1):
                raise StateError("state record: bad partition and offset it moved from")
            moved_from = (moved_from[0], moved_from[1])
        resumed = header.get("resumed")
        if resumed is not None and not _finite_numbers([resumed]):
            raise StateError("state record: bad time its device's latest silence ended")
        for e in header["streams"]:
            s = StreamState(e["channel"], e["stage"], e["last_ts"])
            # checksummed but still unusable (a writer bug, an edited record): refused here, so
            # that one device re-warms instead of the restore failing for its whole partition
            if not isinstance(s.channel, str) or s.channel in channels:
                raise StateError(f"state record: channel {s.channel!r} not a name, or twice")
            channels.add(s.channel)
            if s.last_ts is not None and not _finite_numbers([s.last_ts]):
                raise StateError(f"state record: last_ts {s.last_ts!r} is not a finite number")
            if s.stage == "live":
                delta = np.frombuffer(blob[pos:pos + 2 * n_params], dtype=np.float16).astype(np.float32)
                pos += 2 * n_params
                hc = np.frombuffer(blob[pos:pos + 4 * n_state], dtype=np.float32).reshape(2, self._layers, self._hidden)
                pos += 4 * n_state
                if len(delta) != n_params or hc.size != n_state:
                    raise StateError("state record: truncated weights")
                if not (np.isfinite(delta).all() and np.isfinite(hc).all()):  # encode writes none
                    raise StateError("state record: weights or LSTM state not finite")
                s.params, offset = {}, 0
                for k in self._names:
                    base = self._base[k]
                    s.params[k] = base + torch.from_numpy(delta[offset:offset + base.numel()].copy()).reshape(base.shape)
                    offset += base.numel()
                s.h, s.c = torch.from_numpy(hc[0].copy()), torch.from_numpy(hc[1].copy())
                s.center, s.scale, s.forecast = e["center"], e["scale"], e["forecast"]
                s.scorer = list(e["scorer"])
                if len(s.scorer) not in (6, 7):  # seven since smoothing; six before
                    raise StateError(f"state record: {len(s.scorer)} scorer statistics, not 6 or 7")
                s.drift, s.rebuffer, s.novelty = e.get("drift"), e.get("rebuffer"), e.get("novelty")
                # the shapes their restore takes (PageHinkley: 4; RangeNovelty: 5, then highs and lows)
                if not (_list_or_none(s.drift) and _list_or_none(s.rebuffer) and _list_or_none(s.novelty)) \
                        or (s.drift is not None and len(s.drift) != 4) \
                        or (s.novelty is not None and (len(s.novelty) < 5 or (len(s.novelty) - 5) % 2)):
                    raise StateError("state record: bad drift or range statistics")
                if "online" in e:
                    size, s.since_update = int(e["online"][0]), int(e["online"][1])
                    n_bits = (size + 7) // 8
                    recent = np.frombuffer(blob[pos:pos + 4 * size], dtype=np.float32)
                    bits = np.frombuffer(blob[pos + 4 * size:pos + 4 * size + n_bits], dtype=np.uint8)
                    pos += 4 * size + n_bits
                    if len(recent) != size or len(bits) != n_bits or not np.isfinite(recent).all() \
                            or not 0 <= s.since_update < 2**62:  # a torch.long, room to count on
                        raise StateError("state record: truncated or non-finite history")
                    s.recent = torch.from_numpy(recent.copy())
                    s.learnable = torch.from_numpy(np.unpackbits(bits)[:size].astype(bool))
                if not _finite_numbers([s.center, s.scale, s.forecast, *s.scorer, *(s.drift or ()),
                                        *(s.novelty or ()), *(s.rebuffer or ())]) or s.scale <= 0:
                    raise StateError("state record: non-finite statistics or a scale <= 0")
            elif s.stage == "warming":
                s.buffer = list(e["buffer"])
                if not _finite_numbers(s.buffer):
                    raise StateError("state record: a warm-up buffer holds what is not a finite number")
            else:
                raise StateError(f"state record: unknown stage {s.stage!r}")
            streams.append(s)
        if pos != len(blob):
            raise StateError("state record: trailing bytes")
        return DeviceState(device, covered, streams, peaks, seen, moved_from, resumed)


def _list_or_none(value) -> bool:
    return value is None or isinstance(value, list)


def _finite_numbers(values: list) -> bool:
    """Whether every value is a finite int or float (JSON gives no other numbers; bools are not)."""
    return all(type(v) in (int, float) and math.isfinite(v) for v in values)
