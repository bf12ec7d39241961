"""The Kafka path of the alert consumer against a real Kafka protocol endpoint: librdkafka's built-in mock cluster
(``test.mock.num.brokers``), with consumer groups and committed offsets. ZTF packets (Avro container per message)
and LSST packets (Confluent wire format) on one topic, a junk message among them; then a crash between writing a
batch and committing its offsets, and the re-delivery that follows: at least once, and no duplicate rows."""

from __future__ import annotations

import pytest

from deeprubin.serving import alerts
from deeprubin.serving.alerts import read_classifications, read_rejections
from deeprubin.models.served import ServingModel
from deeprubin.config import load_params
from deeprubin.schema import CLASSES
from tests.alert_packets import (
    lsst_alert_record,
    lsst_schema,
    lsst_source,
    lsst_wire,
    ztf_alert_record,
    ztf_ocf,
    ztf_point,
)
from tests.model_fixtures import served_tcn

confluent_kafka = pytest.importorskip("confluent_kafka")

TOPIC = "ztf-and-lsst-alerts"
GROUP = "deeprubin-test"
# Shorter group timings than librdkafka's defaults, so that a consumer that restarts is given the partitions again
# within seconds (the mock cluster does not hand them over at once when the previous member leaves).
FAST_GROUP = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


@pytest.fixture
def cluster():
    """A producer that owns a one-broker mock cluster; yields (producer, bootstrap servers)."""
    producer = confluent_kafka.Producer({"test.mock.num.brokers": 1})
    metadata = producer.list_topics(timeout=10)
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
    yield producer, bootstrap
    producer.flush(5)


@pytest.fixture(scope="module")
def model() -> ServingModel:
    return ServingModel(uri="local", name="test", version="0", classes=CLASSES, module=served_tcn())


def _produce_ztf(producer, oid: str, start: int, n: int, history: list) -> None:
    for k in range(start, start + n):
        mjd = 59100.0 + 1.5 * k
        packet = ztf_ocf([ztf_alert_record(oid, 1000 + k, mjd, 1 + k % 2, 19.0 - 0.1 * k, prv=list(history))])
        producer.produce(TOPIC, key=oid.encode(), value=packet)
        history.append(ztf_point(mjd, 1 + k % 2, 19.0 - 0.1 * k, 0.1, "t", 1000 + k))
    assert producer.flush(10) == 0


def _committed(bootstrap: str) -> dict[int, int]:
    """Committed offset per partition of TOPIC for GROUP (partitions with a commit only)."""
    c = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP})
    try:
        parts = c.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        tps = c.committed([confluent_kafka.TopicPartition(TOPIC, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        c.close()


def _high_watermarks(bootstrap: str) -> dict[int, int]:
    c = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        parts = c.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        marks = {p: c.get_watermark_offsets(confluent_kafka.TopicPartition(TOPIC, p), timeout=10)[1] for p in parts}
        return {p: high for p, high in marks.items() if high > 0}
    finally:
        c.close()


def test_kafka_consumer_is_at_least_once_without_duplicate_rows(cluster, model, tmp_path, monkeypatch):
    producer, bootstrap = cluster
    ztf_history: list = []
    _produce_ztf(producer, "ZTF25kafkaaa", 0, 4, ztf_history)
    schema = lsst_schema()
    prv: list = []
    for k in range(3):
        src = lsst_source(schema, 8000 + k, 77, 60600.0 + k, "gr"[k % 2], 1500.0 + 200 * k, 60.0)
        producer.produce(TOPIC, key=b"77", value=lsst_wire(schema, lsst_alert_record(schema, src, list(prv))))
        prv.append(src)
    producer.produce(TOPIC, key=b"junk", value=b"\x07 not an alert")
    assert producer.flush(10) == 0

    out = tmp_path / "alerts"
    params = load_params(None, [f"alerts.kafka.bootstrap_servers={bootstrap}", f"alerts.kafka.topic={TOPIC}",
                                f"alerts.kafka.group_id={GROUP}", f"alerts.output_dir={out}",
                                "alerts.batch_alerts=3", "alerts.kafka.poll_timeout_s=0.2"])
    params.alerts.kafka.config = dict(FAST_GROUP)

    first = alerts.consume_kafka(params, model=model, idle_timeout_s=1.5)
    assert (first.alerts_read, first.classified, first.malformed, first.duplicates) == (7, 7, 1, 0)
    rows = read_classifications(out)
    assert len(rows) == 7 and set(rows["format"]) == {"ztf", "lsst"}
    assert rows.set_index("alert_id").loc["1003", "n_det"] == 4
    rejected = read_rejections(out)
    assert len(rejected) == 1 and rejected["packet"].iloc[0].startswith(f"{TOPIC}[")
    assert "@" in rejected["packet"].iloc[0] and rejected["reason"].iloc[0] == "malformed packet"
    assert _committed(bootstrap) == _high_watermarks(bootstrap)  # every message consumed was committed

    # Two more alerts; the consumer dies after writing their batch and before committing its offsets.
    before = _committed(bootstrap)
    _produce_ztf(producer, "ZTF25kafkaaa", 4, 2, ztf_history)

    def crash(self, items):
        raise RuntimeError("killed between the write and the commit")

    with monkeypatch.context() as m:
        m.setattr(alerts.KafkaSource, "commit", crash)
        with pytest.raises(RuntimeError, match="killed between"):
            alerts.consume_kafka(params, model=model, idle_timeout_s=1.5)
    assert _committed(bootstrap) == before  # nothing committed: the two messages will be delivered again
    assert len(read_classifications(out)) == 9  # ... though their rows were written

    again = alerts.consume_kafka(params, model=model, idle_timeout_s=1.5)
    assert again.alerts_read == 2 and again.duplicates == 2 and again.classified == 0  # re-delivered, skipped
    rows = read_classifications(out)
    assert len(rows) == 9 and rows["alert_id"].is_unique
    assert _committed(bootstrap) == _high_watermarks(bootstrap)


def test_kafka_source_needs_a_topic():
    params = load_params(None, ["alerts.kafka.bootstrap_servers=localhost:9092"])
    with pytest.raises(ValueError, match="alerts.kafka.topic"):
        alerts.KafkaSource(params.alerts.kafka)


def test_losing_every_broker_while_consuming_fails_after_the_bound():
    """The cluster goes away under a running consumer: BrokerUnreachable once no broker has answered for
    alerts.kafka.connect_timeout_s (issue 17), not an endless, silent retry."""
    import gc
    import time

    producer = confluent_kafka.Producer({"test.mock.num.brokers": 1})
    bootstrap = ",".join(f"{b.host}:{b.port}" for b in producer.list_topics(timeout=10).brokers.values())
    params = load_params(None, [f"alerts.kafka.bootstrap_servers={bootstrap}", f"alerts.kafka.topic={TOPIC}",
                                "alerts.kafka.connect_timeout_s=2", "alerts.kafka.poll_timeout_s=0.2"])
    source = alerts.KafkaSource(params.alerts.kafka)  # the cluster is up: no error
    try:
        items = iter(source)
        for _ in range(3):
            next(items)
        del producer  # its mock cluster with it
        gc.collect()
        gone = time.monotonic()
        with pytest.raises(alerts.BrokerUnreachable, match="alerts.kafka.connect_timeout_s") as raised:
            for _ in items:
                assert time.monotonic() - gone < 30
        assert bootstrap in str(raised.value) and time.monotonic() - gone >= 2
    finally:
        source.close()
