"""The review store (issue 14) on both backends: SQLite + files, and a real PostgreSQL server."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from pipeline.errors import ConfigError
from schemas.messages import CameraStatus, OODEvent, SourceRef, Vector, WeighedNegative
from workers.processes import free_port
from workers.review_store import open_store


def initdb() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return found[-1] if found else (shutil.which("initdb"))


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own in a temporary folder (deploy/test-deps.sh installs it)."""
    binary = initdb()
    assert binary is not None, "PostgreSQL is not installed: run bash deploy/test-deps.sh"
    bindir = os.path.dirname(binary)
    home = tempfile.mkdtemp(prefix="interneg-pg-")  # not under pytest's 0700 folder: the server runs as 'postgres'
    os.chmod(home, 0o755)
    as_server = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(home, "postgres")
        as_server = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = os.path.join(home, "data")
    subprocess.run([*as_server, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "review", "--no-sync"], check=True,
                   capture_output=True)
    subprocess.run([*as_server, f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(home, "log"), "-w", "start",
                    "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off"], check=True, capture_output=True)
    try:
        yield f"postgresql://review@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_server, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/review/review.db")
    else:
        url = request.getfixturevalue("postgres_url")
        s = open_store(url)
        s._write("DELETE FROM events")
        s._write("DELETE FROM cameras")
        s._write("DELETE FROM thumbnails")
    yield s
    s.close()


def event(status: str, *, event_id="ev-1", camera="yard", frames=3, emitted=1000, best="f1") -> OODEvent:
    return OODEvent(
        event_id=event_id, camera_id=camera, status=status, start_ms=100, end_ms=100 + frames, frames=frames,
        peak_score=0.2, best_frame_id=best, best_source=SourceRef(topic="frames", partition=0, offset=1), id_class="cow",
        negatives=[WeighedNegative(label="lava", cos=0.31)], threshold=0.5, method="interneg",
        embedding=Vector.from_numpy(np.ones(8), "m", "float16"), emitted_ms=emitted,
    )


def test_an_event_moves_forward_only(store):
    assert store.record_event(event("opened", emitted=1000))
    assert store.record_event(event("updated", frames=10, emitted=2000))
    assert store.record_event(event("closed", frames=12, emitted=3000))
    assert not store.record_event(event("updated", frames=11, emitted=4000))  # late: closed stays closed
    got = store.event("ev-1")
    assert (got["status"], got["frames"], got["negatives"]) == ("closed", 12, [{"label": "lava", "cos": 0.31}])
    assert store.embedding("ev-1")["dim"] == 8


def test_filters_verdicts_cameras_and_thumbnails(store):
    store.record_event(event("opened", event_id="ev-a", camera="yard"))
    store.record_event(event("closed", event_id="ev-b", camera="gate"))
    store.record_camera(CameraStatus(camera_id="gate", status="offline", since_ms=5, detail="timeout", emitted_ms=6))
    store.record_camera(CameraStatus(camera_id="gate", status="online", since_ms=4, emitted_ms=7))  # older: ignored
    assert [e["event_id"] for e in store.events(status="open")] == ["ev-a"]
    assert [e["event_id"] for e in store.events(camera="gate")] == ["ev-b"]
    assert store.set_verdict("ev-b", "normal", "ann", 99)
    assert not store.set_verdict("ev-x", "normal", "ann", 99)
    with pytest.raises(ValueError):
        store.set_verdict("ev-a", "maybe", "ann", 99)
    assert [e["event_id"] for e in store.events(verdict="none")] == ["ev-a"]
    assert [(e["event_id"], e["verdict_by"]) for e in store.events(verdict="normal")] == [("ev-b", "ann")]
    cams = {c["camera_id"]: c for c in store.cameras()}
    assert (cams["gate"]["status"], cams["gate"]["open"], cams["yard"]["open"], cams["yard"]["unreviewed"]) == ("offline", 0, 1, 1)
    assert store.needs_thumbnail("ev-a", "f1") and store.thumbnail("ev-a") is None
    store.save_thumbnail("ev-a", "f1", b"\xff\xd8jpeg")
    assert store.thumbnail("ev-a") == b"\xff\xd8jpeg" and not store.needs_thumbnail("ev-a", "f1")
    assert store.needs_thumbnail("ev-a", "f2")  # a better frame came: a new snapshot
    assert store.events(camera="yard")[0]["has_thumbnail"]


def test_a_bad_store_address_is_refused_with_its_reason(tmp_path):
    with pytest.raises(ConfigError, match="not a store"):
        open_store("mysql://x")
    with pytest.raises(ConfigError, match="sqlite:///"):
        open_store("sqlite://relative.db")
    with pytest.raises(ConfigError, match="cannot connect"):
        open_store(f"postgresql://nobody@127.0.0.1:{free_port()}/x")
