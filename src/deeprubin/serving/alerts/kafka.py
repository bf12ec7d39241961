"""The Kafka source of alerts: a topic read with ``confluent_kafka.Consumer`` (``alerts.kafka``), each message one
packet (:func:`deeprubin.serving.alerts.packets.decode_packet`).

Offsets are committed only after the batch holding the messages has been written, and explicitly (never
auto-commit): delivery is **at least once**; the consumer's manifest skips what a re-delivery sends again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

from deeprubin.serving.alerts.packets import IDLE, Item, _Idle, decode_packet

log = logging.getLogger(__name__)


class KafkaSource:
    """Alerts from a Kafka topic (``alerts.kafka``), committed explicitly after each written batch (at least once).

    Iterating yields alerts (and Malformed entries) and :data:`IDLE` after an empty poll. With ``idle_timeout_s``
    iteration ends once partitions were assigned and no message came for that long (tests, catch-up runs); without
    it, it runs until :meth:`close` or an interrupt."""

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
        conf["enable.auto.commit"] = False
        self.kafka, self.format, self.lsst_schema_version = kafka, format, lsst_schema_version
        self.idle_timeout_s, self.assignment_timeout_s = idle_timeout_s, assignment_timeout_s
        self.assigned = False
        self.consumer = Consumer(conf)
        self.consumer.subscribe([kafka.topic], on_assign=self._on_assign)
        self.committed_batches = 0

    def _on_assign(self, consumer, partitions) -> None:
        self.assigned = True

    def __iter__(self) -> Iterator[Item | _Idle]:
        started = last = time.monotonic()
        while True:
            messages = self.consumer.consume(num_messages=500, timeout=self.kafka.poll_timeout_s)
            now = time.monotonic()
            got = False
            for m in messages:
                if m.error():
                    if m.error().fatal():
                        from confluent_kafka import KafkaException

                        raise KafkaException(m.error())
                    log.warning("Kafka: %s", m.error())
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
