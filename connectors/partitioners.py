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

from kafka.partitioner.default import murmur2

KEY_HASHES: dict[str, Callable[[bytes], int]] = {
    "murmur2": lambda key: murmur2(key) & 0x7FFFFFFF,  # the Java client's toPositive(murmur2(key))
    "crc32": zlib.crc32,                               # librdkafka: rd_crc32(key) % count, unsigned
}


def moved_by_growth(placed: dict[str, int], before: int, after: int, partitioner: str = "auto",
                    explained: float = 0.95) -> tuple[str, dict[str, int]]:
    """The partitioner that placed these devices, and the devices the topic's growth moves.

    ``placed`` maps each device to the partition it arrives on; ``before`` and ``after``
    are the topic's partition counts.  A device moves if it is where the partitioner put it
    among ``before`` partitions, and would not be among ``after`` (one elsewhere is not its
    own: a stale copy of a device that moved away earlier, say).  ``partitioner`` names the
    producers' (a key of ``KEY_HASHES``), or is "auto": then a partitioner explains a device
    that is on its
    partition under either count (it may have arrived on its new one already), and the one
    that explains at least ``explained`` of them is taken, if the other does not too.
    Returns its name and each moving device's new partition; "unknown" or "ambiguous",
    and no moves, when neither or both explain the devices (both do after a single
    partition, where every key is on partition 0, or for a few devices by chance).

    >>> from kafka.partitioner.default import murmur2
    >>> fleet = {f"pump-{i}": (murmur2(f"pump-{i}".encode()) & 0x7FFFFFFF) % 2 for i in range(6)}
    >>> fleet
    {'pump-0': 0, 'pump-1': 1, 'pump-2': 1, 'pump-3': 0, 'pump-4': 1, 'pump-5': 1}
    >>> moved_by_growth(fleet, 2, 4)  # to its partition mod 4: the same, or 2 more
    ('murmur2', {'pump-0': 2, 'pump-1': 3, 'pump-2': 3})
    >>> moved_by_growth({"pump-0": 1, "pump-3": 1, "pump-4": 0}, 2, 4)  # where neither would put them
    ('unknown', {})
    >>> moved_by_growth({"pump-0": 0, "pump-1": 0}, 1, 2)  # from one partition: any hash fits
    ('ambiguous', {})
    >>> moved_by_growth({"pump-0": 0, "pump-1": 0}, 1, 2, partitioner="murmur2")
    ('murmur2', {'pump-1': 1})
    """
    if after <= before or not placed:
        return partitioner, {}
    found = {}
    for name in (KEY_HASHES if partitioner == "auto" else (partitioner,)):
        key_hash, moves, fits = KEY_HASHES[name], {}, 0
        for device, partition in placed.items():
            h = key_hash(device.encode())
            home = h % after
            if partition == home:
                fits += 1
            elif partition == h % before:
                fits += 1
                moves[device] = home
        if partitioner != "auto":
            return name, moves
        if fits >= explained * len(placed):
            found[name] = moves
    if len(found) == 1:
        return next(iter(found.items()))
    return ("ambiguous" if found else "unknown"), {}
