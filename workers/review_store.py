"""Where events wait for an operator (issue 14): the events with their snapshots and verdicts.

Two backends behind one class, chosen by the store's address:

- ``sqlite:///path/review.db`` (the default, ``<cache>/review/review.db``): a file and a
  ``thumbnails/`` folder beside it. Nothing to set up; one machine.
- ``postgresql://user:pass@host/db``: a server database that several machines (recorders
  and review pages) share; thumbnails are stored in the database.

Writes are idempotent upserts keyed by event id, so a redelivered event record changes
nothing, and a late "updated" never overwrites a "closed".
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import ConfigError
from schemas.messages import CameraStatus, OODEvent

VERDICTS = ("normal", "confirmed")
STATUS_RANK = {"opened": 0, "updated": 1, "closed": 2}

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS events (
        event_id TEXT PRIMARY KEY,
        camera_id TEXT NOT NULL,
        status TEXT NOT NULL,
        status_rank INTEGER NOT NULL,
        start_ms BIGINT NOT NULL,
        end_ms BIGINT NOT NULL,
        frames INTEGER NOT NULL,
        peak_score DOUBLE PRECISION NOT NULL,
        best_frame_id TEXT NOT NULL,
        id_class TEXT NOT NULL,
        method TEXT NOT NULL,
        threshold DOUBLE PRECISION NOT NULL,
        record TEXT NOT NULL,
        emitted_ms BIGINT NOT NULL,
        thumbnail_frame TEXT,
        verdict TEXT,
        verdict_ms BIGINT,
        verdict_by TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_camera ON events (camera_id, start_ms)",
    """CREATE TABLE IF NOT EXISTS cameras (
        camera_id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        since_ms BIGINT NOT NULL,
        detail TEXT NOT NULL
    )""",
]

# A later record wins, except that an event never goes back from closed.
UPSERT_EVENT = """
INSERT INTO events (event_id, camera_id, status, status_rank, start_ms, end_ms, frames, peak_score, best_frame_id,
                    id_class, method, threshold, record, emitted_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (event_id) DO UPDATE SET
    status = excluded.status, status_rank = excluded.status_rank, end_ms = excluded.end_ms, frames = excluded.frames,
    peak_score = excluded.peak_score, best_frame_id = excluded.best_frame_id, id_class = excluded.id_class,
    record = excluded.record, emitted_ms = excluded.emitted_ms
WHERE excluded.status_rank > events.status_rank
   OR (excluded.status_rank = events.status_rank AND excluded.emitted_ms >= events.emitted_ms)
"""


class ReviewStore:
    """The review store; use :func:`open_store`."""

    def __init__(self, connect, placeholder: str, thumbnails: Path | None):
        self._connect = connect
        self._placeholder = placeholder
        self._thumbnails = thumbnails  # None: in the database
        self._lock = threading.Lock()  # one connection, shared by the recorder and the page's threads
        self._conn = connect()
        with self._lock:
            for statement in SCHEMA:
                self._execute(statement)
            if thumbnails is None:
                self._execute("CREATE TABLE IF NOT EXISTS thumbnails (event_id TEXT PRIMARY KEY, jpeg BYTEA NOT NULL)")
            self._conn.commit()

    # --- plumbing ---------------------------------------------------------------------------
    def _execute(self, sql: str, params: tuple = ()):
        cursor = self._conn.cursor()
        cursor.execute(sql.replace("?", self._placeholder) if self._placeholder != "?" else sql, params)
        return cursor

    def _query(self, sql: str, params: tuple = ()) -> list[dict]:
        with self._lock:
            cursor = self._execute(sql, params)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
            self._conn.commit()
        return rows

    def _write(self, sql: str, params: tuple = ()) -> int:
        with self._lock:
            try:
                count = self._execute(sql, params).rowcount
                self._conn.commit()
            except Exception:
                self._conn.rollback()
                raise
        return count

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- what the recorder writes -----------------------------------------------------------
    def record_event(self, event: OODEvent) -> bool:
        """Store an event record; False when an equal or later one is already there."""
        return self._write(UPSERT_EVENT, (
            event.event_id, event.camera_id, event.status, STATUS_RANK[event.status], event.start_ms, event.end_ms,
            event.frames, event.peak_score, event.best_frame_id, event.id_class, event.method, event.threshold,
            event.model_dump_json(), event.emitted_ms,
        )) > 0

    def record_camera(self, status: CameraStatus) -> None:
        self._write(
            "INSERT INTO cameras (camera_id, status, since_ms, detail) VALUES (?, ?, ?, ?) ON CONFLICT (camera_id) DO UPDATE "
            "SET status = excluded.status, since_ms = excluded.since_ms, detail = excluded.detail WHERE excluded.since_ms >= cameras.since_ms",
            (status.camera_id, status.status, status.since_ms, status.detail),
        )

    def needs_thumbnail(self, event_id: str, frame_id: str) -> bool:
        rows = self._query("SELECT thumbnail_frame FROM events WHERE event_id = ?", (event_id,))
        return bool(rows) and rows[0]["thumbnail_frame"] != frame_id

    def save_thumbnail(self, event_id: str, frame_id: str, jpeg: bytes) -> None:
        if self._thumbnails is not None:
            path = self._thumbnail_path(event_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".part")
            partial.write_bytes(jpeg)
            partial.replace(path)  # a reader never sees half a file
        else:
            self._write("INSERT INTO thumbnails (event_id, jpeg) VALUES (?, ?) ON CONFLICT (event_id) DO UPDATE SET jpeg = excluded.jpeg",
                        (event_id, jpeg))
        self._write("UPDATE events SET thumbnail_frame = ? WHERE event_id = ?", (frame_id, event_id))

    # --- what the page reads and writes -----------------------------------------------------
    def events(self, camera: str | None = None, status: str | None = None, verdict: str | None = None, limit: int = 200) -> list[dict]:
        where, params = [], []
        if camera:
            where.append("camera_id = ?")
            params.append(camera)
        if status == "open":
            where.append("status <> 'closed'")
        elif status:
            where.append("status = ?")
            params.append(status)
        if verdict == "none":
            where.append("verdict IS NULL")
        elif verdict:
            where.append("verdict = ?")
            params.append(verdict)
        sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY start_ms DESC, event_id LIMIT ?"
        return [self._public(row) for row in self._query(sql, (*params, max(1, min(int(limit), 1000))))]

    def event(self, event_id: str) -> dict | None:
        rows = self._query("SELECT * FROM events WHERE event_id = ?", (event_id,))
        return self._public(rows[0]) if rows else None

    def embedding(self, event_id: str) -> dict | None:
        """The best frame's embedding as the event record carried it (a Vector's JSON), for "normal"."""
        rows = self._query("SELECT record FROM events WHERE event_id = ?", (event_id,))
        return json.loads(rows[0]["record"]).get("embedding") if rows else None

    def thumbnail(self, event_id: str) -> bytes | None:
        if self._thumbnails is not None:
            path = self._thumbnail_path(event_id)
            return path.read_bytes() if path.is_file() else None
        rows = self._query("SELECT jpeg FROM thumbnails WHERE event_id = ?", (event_id,))
        return bytes(rows[0]["jpeg"]) if rows else None

    def set_verdict(self, event_id: str, verdict: str, by: str, now_ms: int) -> bool:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
        return self._write("UPDATE events SET verdict = ?, verdict_ms = ?, verdict_by = ? WHERE event_id = ?",
                           (verdict, now_ms, by, event_id)) > 0

    def cameras(self) -> list[dict]:
        counts = self._query(
            "SELECT camera_id, COUNT(*) AS events, SUM(CASE WHEN status <> 'closed' THEN 1 ELSE 0 END) AS open, "
            "SUM(CASE WHEN verdict IS NULL THEN 1 ELSE 0 END) AS unreviewed FROM events GROUP BY camera_id")
        status = {row["camera_id"]: row for row in self._query("SELECT * FROM cameras")}
        out = {row["camera_id"]: {"camera_id": row["camera_id"], "events": int(row["events"]), "open": int(row["open"] or 0),
                                  "unreviewed": int(row["unreviewed"] or 0), "status": None, "since_ms": None} for row in counts}
        for camera_id, row in status.items():
            out.setdefault(camera_id, {"camera_id": camera_id, "events": 0, "open": 0, "unreviewed": 0})
            out[camera_id].update(status=row["status"], since_ms=row["since_ms"])
        return sorted(out.values(), key=lambda c: c["camera_id"])

    # --- helpers ----------------------------------------------------------------------------
    def _thumbnail_path(self, event_id: str) -> Path:
        # a hash, not the id made safe: ids from records that differ only where one is cut or
        # replaced ("a/b", "a.b") would share a file, and one event show the other's frame
        return self._thumbnails / f"{hashlib.sha256(event_id.encode('utf-8', 'surrogatepass')).hexdigest()}.jpg"

    @staticmethod
    def _public(row: dict) -> dict:
        record = json.loads(row["record"])
        return {
            "event_id": row["event_id"], "camera_id": row["camera_id"], "status": row["status"],
            "start_ms": int(row["start_ms"]), "end_ms": int(row["end_ms"]), "frames": int(row["frames"]),
            "peak_score": float(row["peak_score"]), "best_frame_id": row["best_frame_id"], "id_class": row["id_class"],
            "method": row["method"], "threshold": float(row["threshold"]), "negatives": record.get("negatives", []),
            "has_thumbnail": row["thumbnail_frame"] is not None, "verdict": row["verdict"],
            "verdict_ms": int(row["verdict_ms"]) if row["verdict_ms"] is not None else None, "verdict_by": row["verdict_by"],
        }


def open_store(url: str) -> ReviewStore:
    """``sqlite:///path/review.db`` or ``postgresql://…``; a ConfigError names what is wrong."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise ConfigError(f"review store: {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        path = Path(url[len("sqlite:///"):])  # as SQLAlchemy: three slashes, then the path
        path.parent.mkdir(parents=True, exist_ok=True)
        return ReviewStore(lambda: sqlite3.connect(path, check_same_thread=False), "?", path.parent / "thumbnails")
    if scheme in ("postgresql", "postgres"):
        import psycopg

        try:
            return ReviewStore(lambda: psycopg.connect(url, connect_timeout=10), "%s", None)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"review store: cannot connect to {urlsplit(url)._replace(netloc=urlsplit(url).hostname or '').geturl()}: {str(exc).strip()[:300]}") from None
    raise ConfigError(f"review store: {url.split(':', 1)[0]!r} is not a store; use sqlite:///path/review.db or postgresql://user@host/db")
