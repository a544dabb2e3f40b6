"""Where producers put a device's readings, and where they move when the input topic grows.

Producers key each reading by its device id, and their partitioner maps the key to a
partition: ``hash(key) % partitions``.  Adding partitions changes that modulus, so many
devices move to another partition, and with it, often, to another instance of the
group.  ``moved_by_growth`` finds them, so that the instance losing a device can hand
its state to the partition the device arrives on from now on.

Two partitioners cover nearly every producer: murmur2, the default of the Java client
and kafka-python (and librdkafka's ``murmur2_random``), and CRC-32, librdkafka's default
(confluent-kafka, kcat).  Which one the producers use is read off the devices
themselves: the one that explains where they are.  With any other partitioner nothing is
moved, and the devices that move re-warm where they arrive.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple

from kafka.partitioner.default import murmur2

KEY_HASHES: dict[str, Callable[[bytes], int]] = {
    "murmur2": lambda key: murmur2(key) & 0x7FFFFFFF,  # the Java client's toPositive(murmur2(key))
    "crc32": zlib.crc32,                               # librdkafka: rd_crc32(key) % count, unsigned
}


class Growth(NamedTuple):
    """What a topic's growth does to a set of devices: see ``moved_by_growth``.

    >>> partitioner, moves, explained = moved_by_growth({"pump-0": 0, "pump-1": 0}, 1, 2, "murmur2")
    >>> partitioner, moves, explained
    ('murmur2', {'pump-1': 1}, 1.0)
    """

    partitioner: str            # a key of KEY_HASHES, or "unknown" / "ambiguous"
    moves: dict[str, int]       # device -> the partition it moves to
    explained: float            # the share of the judged devices where the partitioner puts them


def moved_by_growth(placed: dict[str, int], before: int, after: int, partitioner: str = "auto",
                    judged: set[str] | None = None, enough: float = 0.95) -> Growth:
    """The partitioner that placed these devices, and the devices the topic's growth moves.

    ``placed`` maps each device to the partition it arrives on; ``before`` and ``after``
    are the topic's partition counts (after > before).  A device moves if it is where the
    partitioner put it among ``before`` partitions, and would not be among ``after`` (one
    elsewhere is not its own: a stale copy of a device that moved away earlier, say).  A partitioner explains a
    device that is on its partition under either count (it may have arrived on its new one
    already); only the devices in ``judged`` (default: all) count, so that such stale
    copies do not.  ``partitioner`` names the producers' (a key of ``KEY_HASHES``), or is
    "auto": then the one that explains at least ``enough`` of the devices is taken, if the
    other does not too; "unknown" or "ambiguous", and no moves, when neither or both do
    (both do after a single partition, where every key is on partition 0, or for a few
    devices by chance).

    >>> from kafka.partitioner.default import murmur2
    >>> fleet = {f"pump-{i}": (murmur2(f"pump-{i}".encode()) & 0x7FFFFFFF) % 2 for i in range(6)}
    >>> fleet
    {'pump-0': 0, 'pump-1': 1, 'pump-2': 1, 'pump-3': 0, 'pump-4': 1, 'pump-5': 1}
    >>> moved_by_growth(fleet, 2, 4)  # to its partition mod 4: the same, or 2 more
    Growth(partitioner='murmur2', moves={'pump-0': 2, 'pump-1': 3, 'pump-2': 3}, explained=1.0)
    >>> moved_by_growth({"pump-0": 1, "pump-3": 1, "pump-4": 0}, 2, 4).partitioner  # where neither puts them
    'unknown'
    >>> moved_by_growth({"pump-0": 0, "pump-1": 0}, 1, 2).partitioner  # from one partition any hash fits
    'ambiguous'
    >>> moved_by_growth({"pump-0": 0, "pump-1": 0}, 1, 2, partitioner="murmur2").moves
    {'pump-1': 1}
    """
    if after <= before:
        raise ValueError(f"a growth: {after} partitions must be more than {before}")
    judged = set(placed) if judged is None else judged & set(placed)
    found = {}
    for name in (KEY_HASHES if partitioner == "auto" else (partitioner,)):
        key_hash, moves, fits = KEY_HASHES[name], {}, 0
        for device, partition in placed.items():
            h = key_hash(device.encode())
            home = h % after
            if partition == home:
                fits += device in judged
            elif partition == h % before:
                fits += device in judged
                moves[device] = home
        share = fits / len(judged) if judged else 1.0
        if partitioner != "auto":
            return Growth(name, moves, share)
        if share >= enough:
            found[name] = Growth(name, moves, share)
    if len(found) == 1:
        return next(iter(found.values()))
    return Growth("ambiguous" if found else "unknown", {}, 0.0)
