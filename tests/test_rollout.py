"""A new bundle rolls out to a running scoring worker without a restart (issue 14), and one
that does not match what was rolled out is refused while the worker goes on."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from pipeline.bundle import manifest_digest
from schemas.messages import BundleRollout, FrameScore
from test_streaming import frame_record, jpeg, read_topic
from workers.control import rollout_output
from workers.delivery import send_and_confirm
from workers.kafka_clients import make_producer
from workers.processes import settings_env
from workers.producer import produce_records


def interneg(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], env={**os.environ, **settings_env(settings)},
                          capture_output=True, text=True, timeout=120)


def scored(settings, n: int) -> dict[str, FrameScore]:
    return {FrameScore.from_bytes(r.value).frame_id: FrameScore.from_bytes(r.value) for r in read_topic(settings, settings.topics.scores, expect=n)}


def wait_status(worker, check, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while not check(worker.status()):
        assert time.monotonic() < deadline, f"{what}: {worker.status()}"
        time.sleep(0.3)


def test_a_rolled_out_bundle_is_adopted_between_batches_and_a_mismatched_one_refused(stream_settings, tiny_bundle_dir, other_bundle, workers, tmp_path):
    s = stream_settings
    s.worker.bundle = tiny_bundle_dir
    scorer = workers("score-worker", s, "scorer")
    scorer.wait_ready()
    produce_records(s, [frame_record(0, jpeg(0))])
    first = scored(s, 1)["f0"]
    assert first.id_class in {"red circle", "green square", "blue circle"}

    done = interneg(s, "rollout", str(other_bundle), "--by", "tester")
    assert done.returncode == 0, done.stderr
    wait_status(scorer, lambda st: st["bundle_digest"] == manifest_digest(other_bundle), "the worker adopted the rolled-out bundle")
    produce_records(s, [frame_record(1, jpeg(1))])
    assert scored(s, 2)["f1"].id_class in {"yellow square", "purple disc"}  # the new bundle's classes, same process
    assert scorer.process.poll() is None

    # a record naming a bundle whose files are not the ones rolled out: refused, the worker goes on
    tampered = tmp_path / "tampered"
    shutil.copytree(other_bundle, tampered)
    forged = BundleRollout(path=str(tampered), manifest_sha256="0" * 64, by="someone", applied_ms=1)
    producer = make_producer(s.kafka)
    send_and_confirm(producer, [rollout_output(s.topics.control, forged)])
    producer.close()
    wait_status(scorer, lambda st: st["rollout_error"] is not None, "the mismatched rollout refused")
    assert "not the one rolled out" in scorer.status()["rollout_error"]
    produce_records(s, [frame_record(2, jpeg(2))])
    assert scored(s, 3)["f2"].id_class in {"yellow square", "purple disc"}
    assert scorer.status()["bundle_digest"] == manifest_digest(other_bundle)

    # the command checks a bundle before sending it: a damaged file is refused with one line, exit 2
    victim = next(p for p in sorted(tampered.iterdir()) if p.suffix == ".npy")
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    done = interneg(s, "rollout", str(tampered))
    assert done.returncode == 2 and done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1, done.stderr
