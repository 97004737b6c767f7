"""``interneg ui``: the recorder thread and the review page in one process."""
from __future__ import annotations

import threading

import uvicorn

from schemas.messages import AllowEntry
from schemas.settings import Settings
from workers.control import allow_output
from workers.delivery import send_and_confirm
from workers.kafka_clients import make_producer
from workers.ops import configure_logging, get_logger
from workers.review_app import make_app
from workers.review_recorder import Recorder
from workers.review_store import open_store


def default_store_url(settings: Settings) -> str:
    return f"sqlite:///{(settings.cache_dir / 'review' / 'review.db').resolve()}"


def serve_review(settings: Settings, *, store_url: str | None, host: str, port: int, operator: str, echo) -> int:
    configure_logging()
    log = get_logger("review")
    store = open_store(store_url or default_store_url(settings))  # a bad address is refused before anything starts
    producer = make_producer(settings.kafka)
    recorder = Recorder(settings, store, log)
    thread = threading.Thread(target=recorder.run, name="recorder", daemon=True)
    thread.start()

    def publish(entry: AllowEntry) -> None:
        send_and_confirm(producer, [allow_output(settings.topics.control, entry)])
        log.info("allow-list entry published", entry=entry.entry_id, camera=entry.camera_id, event_id=entry.event_id)

    echo(f"review page: http://{host}:{port}/  (store {store_url or default_store_url(settings)})")
    try:
        uvicorn.run(make_app(store, publish, operator), host=host, port=port, log_level="warning")
    finally:
        recorder.stop_event.set()
        thread.join(timeout=10)
        producer.close(timeout=10)
        store.close()
    return 0
