"""Alert-stream consumer: ZTF Avro alerts and LSST alert packets -> per-object light curves -> one classification
per alert.

* :mod:`~deeprubin.serving.alerts.packets`: packet decoding (ZTF, LSST; OCF or wire format) into alerts, malformed
  packets reported and skipped; the files of a directory of packets.
* :mod:`~deeprubin.serving.alerts.kafka`: the Kafka source, offsets committed after each written batch.
* :mod:`~deeprubin.serving.alerts.book`: the bounded light-curve book, and curves as of each alert.
* :mod:`~deeprubin.serving.alerts.consume`: batched classification, Parquet parts and the manifest (no duplicate
  rows across reruns or re-deliveries), the loop and ``deeprubin consume`` (:func:`run`).
* :mod:`~deeprubin.serving.alerts.replay`: labelled light curves replayed alert by alert, and early-classification
  metrics.
"""

from deeprubin.serving.alerts.book import LightCurveBook
from deeprubin.serving.alerts.consume import (
    OUTPUT_COLUMNS,
    AlertClassifier,
    AlertWriter,
    ConsumeResult,
    consume,
    consume_directory,
    consume_kafka,
    read_classifications,
    read_rejections,
    run,
)
from deeprubin.serving.alerts.kafka import BrokerUnreachable, KafkaSource
from deeprubin.serving.alerts.packets import Alert, Malformed, SchemaVersionError, decode_packet, iter_directory
from deeprubin.serving.alerts.replay import (
    EARLY_BINS,
    alerts_from_detections,
    early_goal,
    early_markdown,
    early_metrics,
    replay_detections,
)

__all__ = [
    "EARLY_BINS",
    "OUTPUT_COLUMNS",
    "Alert",
    "AlertClassifier",
    "AlertWriter",
    "BrokerUnreachable",
    "ConsumeResult",
    "KafkaSource",
    "LightCurveBook",
    "Malformed",
    "SchemaVersionError",
    "alerts_from_detections",
    "consume",
    "consume_directory",
    "consume_kafka",
    "decode_packet",
    "early_goal",
    "early_markdown",
    "early_metrics",
    "iter_directory",
    "read_classifications",
    "read_rejections",
    "replay_detections",
    "run",
]
