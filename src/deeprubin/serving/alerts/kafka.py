"""The Kafka source of alerts: a topic read with ``confluent_kafka.Consumer`` (``alerts.kafka``), each message one
packet (:func:`deeprubin.serving.alerts.packets.decode_packet`).

Offsets are committed only after the batch holding the messages has been written, and explicitly (never
auto-commit): delivery is **at least once**; the consumer's manifest skips what a re-delivery sends again.

No broker reachable (a wrong address, Kafka down, a refused login): librdkafka would retry for ever, logging a line
per attempt. Here its log goes to the DEBUG level of logger ``deeprubin.serving.alerts.kafka.librdkafka``, each
kind of error it reports is logged once (a warning of this module), and :class:`BrokerUnreachable` is raised once
no broker has answered for ``alerts.kafka.connect_timeout_s``: at start (before the model is loaded), or after all
of them went away while consuming.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

from deeprubin.serving.alerts.packets import IDLE, Item, _Idle, decode_packet

log = logging.getLogger(__name__)
librdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

#: Error codes (``KafkaError`` names) that mean "no broker answers", as opposed to an error of one request.
UNREACHABLE = ("_TRANSPORT", "_ALL_BROKERS_DOWN", "_RESOLVE", "_AUTHENTICATION", "_SSL")


class BrokerUnreachable(ConnectionError):
    """No broker of ``alerts.kafka.bootstrap_servers`` answered for ``alerts.kafka.connect_timeout_s``."""


class _LibrdkafkaLog:
    """librdkafka's log lines (several a second per broker that refuses connections), at DEBUG: every error they
    narrate also reaches the error callback, which reports each kind once."""

    def log(self, level: int, msg: str, *args) -> None:
        librdkafka_log.debug(msg, *args)


class KafkaSource:
    """Alerts from a Kafka topic (``alerts.kafka``), committed explicitly after each written batch (at least once).

    Iterating yields alerts (and Malformed entries) and :data:`IDLE` after an empty poll. With ``idle_timeout_s``
    iteration ends once partitions were assigned and no message came for that long (tests, catch-up runs); without
    it, it runs until :meth:`close` or an interrupt.

    Raises :class:`BrokerUnreachable` when no broker answers for ``kafka.connect_timeout_s``: here (the first
    metadata request), or while iterating (all brokers down that long)."""

    def __init__(self, kafka, format: str = "auto", lsst_schema_version: str | None = None,
                 idle_timeout_s: float | None = None, assignment_timeout_s: float = 60.0):
        if not kafka.bootstrap_servers or not kafka.topic:
            raise ValueError("alerts.kafka.bootstrap_servers and alerts.kafka.topic must both be set to read Kafka "
                             f"(got {kafka.bootstrap_servers!r}, {kafka.topic!r})")
        from confluent_kafka import Consumer

        conf = {"bootstrap.servers": kafka.bootstrap_servers, "group.id": kafka.group_id,
                "auto.offset.reset": kafka.auto_offset_reset, **dict(kafka.config)}
        if str(conf.get("enable.auto.commit", "false")).lower() == "true":
            log.warning("alerts.kafka.config enable.auto.commit=true ignored: offsets are committed after each "
                        "written batch")
        conf.update({"enable.auto.commit": False, "logger": _LibrdkafkaLog(), "error_cb": self._on_error})
        self.kafka, self.format, self.lsst_schema_version = kafka, format, lsst_schema_version
        self.idle_timeout_s, self.assignment_timeout_s = idle_timeout_s, assignment_timeout_s
        self.assigned = False
        self.committed_batches = 0
        self._fatal = None  # a fatal KafkaError from the error callback, raised by the loop
        self._reported: set[tuple[str, str]] = set()  # errors already logged once
        self._last_error = ""  # what librdkafka last said about a broker it cannot reach
        self._down_since: float | None = None  # when it said all brokers were down (cleared once one answers)
        self.consumer = Consumer(conf)
        try:
            self._wait_for_a_broker()
            self.consumer.subscribe([kafka.topic], on_assign=self._on_assign)
        except BaseException:
            self.consumer.close()
            raise

    def _on_assign(self, consumer, partitions) -> None:
        self.assigned = True

    def _on_error(self, error) -> None:
        """librdkafka's error callback (called from poll/consume, in this thread): each kind of error logged once."""
        if error.fatal():
            self._fatal = error
            return
        name = error.name()
        if name in UNREACHABLE:
            if name == "_ALL_BROKERS_DOWN":
                if self._down_since is None:
                    self._down_since = time.monotonic()
            else:
                self._last_error = error.str()
            self._report(("unreachable", ""), f"Kafka: cannot reach {self.kafka.bootstrap_servers} ({error.str()}); "
                         f"retrying for up to {self.kafka.connect_timeout_s:g} s (alerts.kafka.connect_timeout_s)")
        else:
            self._report((name, error.str()), f"Kafka: {error.str()}")

    def _report(self, key: tuple[str, str], message: str) -> None:
        """Log ``message`` as a warning the first time ``key`` comes (librdkafka repeats its errors at every retry)."""
        if key not in self._reported:
            self._reported.add(key)
            log.warning("%s", message)

    def _reachable(self, timeout_s: float) -> bool:
        """Whether a broker answers a metadata request for the topic within ``timeout_s``."""
        from confluent_kafka import KafkaException

        try:
            self.consumer.list_topics(topic=self.kafka.topic, timeout=timeout_s)
        except KafkaException as exc:
            self._last_error = self._last_error or (exc.args[0].str() if exc.args else str(exc))
            return False
        return True

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            from confluent_kafka import KafkaException

            raise KafkaException(self._fatal)

    def _unreachable(self, seconds: float) -> BrokerUnreachable:
        why = f": {self._last_error}" if self._last_error else ""
        return BrokerUnreachable(f"no Kafka broker reachable at {self.kafka.bootstrap_servers} for {seconds:.0f} s "
                                 f"(alerts.kafka.connect_timeout_s = {self.kafka.connect_timeout_s:g}){why}")

    def _wait_for_a_broker(self) -> None:
        started = time.monotonic()
        deadline = started + self.kafka.connect_timeout_s
        while True:
            reachable = self._reachable(max(0.1, min(1.0, deadline - time.monotonic())))
            self.consumer.poll(0)  # not subscribed yet (no message to lose): serves the error callback and the log
            self._raise_fatal()
            if reachable:
                break
            if time.monotonic() >= deadline:
                raise self._unreachable(time.monotonic() - started)
        self._down_since, self._last_error = None, ""
        self._reported.discard(("unreachable", ""))

    def __iter__(self) -> Iterator[Item | _Idle]:
        started = last = time.monotonic()
        while True:
            messages = self.consumer.consume(num_messages=500, timeout=self.kafka.poll_timeout_s)
            self._raise_fatal()
            now = time.monotonic()
            if messages:
                self._down_since = None
            elif self._down_since is not None:  # all brokers went down: back within the bound, or give up
                if self._reachable(self.kafka.poll_timeout_s):
                    log.warning("Kafka: %s reachable again", self.kafka.bootstrap_servers)
                    self._down_since, self._last_error = None, ""
                    self._reported.discard(("unreachable", ""))
                elif time.monotonic() - self._down_since >= self.kafka.connect_timeout_s:
                    raise self._unreachable(time.monotonic() - self._down_since)
            got = False
            for m in messages:
                if m.error():
                    if m.error().fatal():
                        from confluent_kafka import KafkaException

                        raise KafkaException(m.error())
                    self._report((m.error().name(), m.error().str()), f"Kafka: {m.error().str()}")
                    continue
                got = True
                yield from self._decode(m)
            if got:
                last = now
                continue
            yield IDLE
            if self.idle_timeout_s is not None:
                if self.assigned and now - last >= self.idle_timeout_s:
                    return
                if not self.assigned and now - started >= max(self.assignment_timeout_s, self.idle_timeout_s):
                    log.warning("Kafka: no partition of %s assigned after %.0f s", self.kafka.topic, now - started)
                    return
            if not self.assigned:
                last = now

    def _decode(self, m) -> Iterator[Item]:
        position = (m.topic(), m.partition(), m.offset())
        name = f"{m.topic()}[{m.partition()}]@{m.offset()}"
        items = decode_packet(m.value() or b"", name, self.format, self.lsst_schema_version)
        for i, item in enumerate(items):
            yield _with_position(item, position, i == len(items) - 1)

    def commit(self, items: Sequence[Item]) -> None:
        """Commit the offsets of ``items`` (all written): a message is committed once its last alert was written."""
        from confluent_kafka import KafkaException, TopicPartition

        upto: dict[tuple[str, int], int] = {}
        for item in items:
            if item.position is None:
                continue
            topic, partition, offset = item.position
            upto[(topic, partition)] = offset + 1 if item.last_in_packet else offset
        if not upto:
            return
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in upto.items()],
                                 asynchronous=False)
            self.committed_batches += 1
        except KafkaException as exc:  # e.g. partitions revoked by a rebalance: they will be re-delivered
            log.warning("Kafka: commit failed (%s); the messages will be delivered again and skipped as written",
                        exc)

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> KafkaSource:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _with_position(item: Item, position: tuple[str, int, int], last: bool) -> Item:
    return replace(item, position=position, last_in_packet=last)
