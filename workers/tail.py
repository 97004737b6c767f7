"""Print alerts (or frame scores, or dead letters) from a topic as they arrive.

The tail reads without a consumer group: it assigns itself every partition of the topic
and starts at the end (or the beginning), so it commits nothing and never disturbs the
groups of the workers. It reads with isolation_level=read_committed, so in exactly-once
mode only committed alerts are shown.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import TextIO

from kafka import TopicPartition
from pydantic import TypeAdapter, ValidationError

from pipeline.errors import InterNegError
from schemas.messages import (
    H_DL_DETAIL,
    H_DL_OFFSET,
    H_DL_PARTITION,
    H_DL_REASON,
    H_DL_TOPIC,
    H_DL_TRUNCATED,
    H_DL_WORKER,
    FrameScore,
    JudgedFrame,
    OODAlert,
)
from schemas.settings import Settings
from workers.delivery import header, poll_readable
from workers.kafka_clients import make_consumer

POLL_MS = 500


class TailError(InterNegError):
    """The tail cannot start (e.g. the topic does not exist)."""


def _when(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    except (OverflowError, OSError, ValueError):  # a record's ts far outside the calendar
        return f"ts={ms}ms"


def _shown(text: str) -> str:
    """Text from a record, with anything unprintable escaped: a record must not be able to
    move the cursor, clear the screen or forge lines on an operator's terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# A record of the alerts or the scores topic: the two differ (an alert carries the frame's
# embedding, a score its timings), and either prints as one line.
JUDGED = TypeAdapter(OODAlert | FrameScore)


def format_alert(alert: JudgedFrame) -> str:
    """One readable line: time, camera, frame id, verdict, score, top ID class, weighed negatives.

    The time is the frame's ``ts`` (when the camera took it) when known, else when it was scored.
    """
    negatives = ", ".join(f"{_shown(n.label)} ({n.cos:.2f})" for n in alert.negatives) or "-"
    return (
        f"{_when(alert.ts_ms if alert.ts_ms is not None else alert.scored_at_ms)}  "
        f"camera={_shown(alert.camera_id)}  frame={_shown(alert.frame_id)}  {alert.verdict.upper()}  "
        f"score={alert.score:.4f} (threshold {alert.threshold:.4f})  "
        f"top={_shown(alert.id_class)} ({alert.id_prob:.2f})  negatives: {negatives}"
    )


def dead_letter_fields(record) -> dict:
    """Why and where from, as the dead-letter headers say (None where one is missing); the
    original record's key and size. Texts are decoded, not yet escaped."""

    def text(value: bytes | None) -> str | None:
        return None if value is None else value.decode("utf-8", "replace")

    def number(value: bytes | None) -> int | str | None:
        shown = text(value)
        return int(shown) if shown is not None and shown.isascii() and shown.isdigit() else shown

    return {
        "reason": text(header(record, H_DL_REASON)),
        "detail": text(header(record, H_DL_DETAIL)),
        "source": {"topic": text(header(record, H_DL_TOPIC)), "partition": number(header(record, H_DL_PARTITION)),
                   "offset": number(header(record, H_DL_OFFSET))},
        "worker": text(header(record, H_DL_WORKER)),
        "truncated": text(header(record, H_DL_TRUNCATED)),
        "key": text(record.key),
        "bytes": len(record.value or b""),
        "dead_lettered_ms": record.timestamp,
    }


def format_dead_letter(record) -> str:
    """One readable line: when, why (reason, detail), where the original was (topic[partition]@offset),
    which worker, the original's key and size. Every text from the record is escaped."""
    f = dead_letter_fields(record)
    shown = lambda value: "-" if value is None else _shown(str(value))  # noqa: E731
    source = f["source"]
    line = (
        f"{_when(record.timestamp)}  DEAD-LETTER  reason={shown(f['reason'])}  "
        f"source={shown(source['topic'])}[{shown(source['partition'])}]@{shown(source['offset'])}  "
        f"worker={shown(f['worker'])}  key={shown(f['key'])}  {f['bytes']} bytes  detail={shown(f['detail'])}"
    )
    return line + (f"  truncated={shown(f['truncated'])}" if f["truncated"] is not None else "")


def tail(
    settings: Settings,
    *,
    topic: str | None = None,
    from_beginning: bool = False,
    max_records: int | None = None,
    timeout_s: float | None = None,
    out: TextIO = sys.stdout,
    as_json: bool = False,
    err: TextIO = sys.stderr,
) -> int:
    """Print alerts as they arrive; return how many were printed.

    Options (CLI flags):
      topic           topic to read; default ``settings.topics.alerts``. Any topic of
                      ``FrameScore`` JSON works, e.g. ``settings.topics.scores``. The
                      dead-letter topic (``settings.topics.deadletter``) shows each record's
                      reason, detail and source from its x-dl-* headers (format_dead_letter).
      from_beginning  start at the earliest offset of every partition; False (default):
                      only alerts written after the tail started.
      max_records     stop after printing this many; None = no limit.
      timeout_s       stop when nothing has arrived for this many seconds (an idle
                      timeout, like kafka-console-consumer's --timeout-ms); None = wait forever.
      out             where alerts go (default stdout), one line each, flushed per line.
      as_json         print each alert's JSON (one object per line) instead of the readable line:
                      the record's value as written when it is one line, else compacted.
      err             where warnings go (default stderr): a record that is not a valid
                      FrameScore/OODAlert gets one warning line naming its partition and
                      offset, and the tail goes on. Kept apart from ``out`` so JSON stays clean.

    Ctrl-C stops the tail and returns the count. Raises TailError if the topic does not exist.
    """
    topic = topic or settings.topics.alerts
    render = _render_dead_letter if topic == settings.topics.deadletter else _render
    if max_records is not None and max_records <= 0:
        return 0
    consumer = make_consumer(settings.kafka, group_id=None, isolation_level="read_committed")
    printed = 0
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise TailError(f"topic {topic!r} does not exist (or has no partitions) at {settings.kafka.bootstrap_servers}")
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        if from_beginning:
            consumer.seek_to_beginning(*assignment)
        else:
            consumer.seek_to_end(*assignment)
        for tp in assignment:  # resolve the offsets now: "the end" means when the tail started
            consumer.position(tp)
        last_record = time.monotonic()
        while max_records is None or printed < max_records:
            wait_ms = POLL_MS
            if timeout_s is not None:
                left = timeout_s - (time.monotonic() - last_record)
                if left <= 0:
                    break
                wait_ms = max(1, min(POLL_MS, int(left * 1000)))
            batches = poll_readable(consumer, wait_ms, on_unreadable=lambda u: print(
                f"warning: {u.partition.topic}[{u.partition.partition}]@{u.offset}: the Kafka client cannot decode this record, skipped",
                file=err, flush=True))
            if not batches:
                continue
            last_record = time.monotonic()
            for tp, records in sorted(batches.items(), key=lambda item: item[0].partition):
                for record in records:
                    if max_records is not None and printed >= max_records:
                        break
                    line = render(record, as_json, err)
                    if line is not None:
                        print(line, file=out, flush=True)
                        printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return printed


def _render(record, as_json: bool, err: TextIO) -> str | None:
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    if record.value is None:
        print(f"warning: {where}: null value (tombstone), skipped", file=err, flush=True)
        return None
    try:
        alert = JUDGED.validate_json(record.value)
    except ValidationError as exc:
        problems = exc.errors()
        first = problems[0] if problems else {}
        loc = ".".join(str(part) for part in first.get("loc", ())) or "value"
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        print(
            f"warning: {where}: not a valid alert ({len(record.value)} bytes): {loc}: {first.get('msg', exc)}{more}",
            file=err,
            flush=True,
        )
        return None
    if not as_json:
        return format_alert(alert)
    text = record.value.decode("utf-8").strip()
    return text if "\n" not in text and "\r" not in text else alert.model_dump_json()


def _render_dead_letter(record, as_json: bool, err: TextIO) -> str:
    # the original's value is an undecodable frame more often than not: never printed, only its size
    return json.dumps(dead_letter_fields(record)) if as_json else format_dead_letter(record)


__all__ = ["TailError", "dead_letter_fields", "format_alert", "format_dead_letter", "tail"]
