"""Security against the real broker: SASL/PLAIN and TLS listeners, refused credentials, no pickle.

The session broker (deploy/kafka/broker.sh) has a SASL_PLAINTEXT listener with one PLAIN
user and, where openssl exists, an SSL listener that requires client certificates; the
``kafka_security`` fixture reads their addresses and credentials from the broker's DIR.
"""
from __future__ import annotations

import ast
import inspect
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.messages import H_CAMERA_ID, H_CONTENT_TYPE, H_FRAME_ID, H_TS, FrameScore
from conftest import fresh_deployment
from pipeline.bundle import prepare_bundle, save_bundle
from schemas.settings import Settings
from test_streaming import read_topic
from workers.kafka_clients import make_admin
from workers.kafka_security import KafkaAuthError, KafkaSecurityError
from workers.processes import WorkerProcess, settings_env
from workers.producer import produce_records

ROOT = Path(__file__).resolve().parent.parent


# --- helpers ---------------------------------------------------------------------------------
def secured(settings: Settings, sec, protocol: str, **overrides) -> Settings:
    """A copy of ``settings`` that reaches the session broker through its SASL_PLAINTEXT or SSL listener."""
    s = settings.model_copy(deep=True)
    k = s.kafka
    k.security_protocol = protocol
    if protocol == "SASL_PLAINTEXT":
        k.bootstrap_servers = sec.sasl_bootstrap
        k.sasl_mechanism, k.sasl_plain_username, k.sasl_plain_password = "PLAIN", sec.sasl_username, sec.sasl_password
    elif protocol == "SSL":
        k.bootstrap_servers = sec.ssl_bootstrap
        k.ssl_cafile, k.ssl_certfile, k.ssl_keyfile = sec.ssl_cafile, sec.ssl_certfile, sec.ssl_keyfile
    for name, value in overrides.items():
        setattr(k, name, value)
    return s


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(rng.integers(0, 256, size=3), 40, size=(48, 64, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def frame_record(i: int):
    headers = [(H_FRAME_ID, f"f{i}".encode()), (H_CAMERA_ID, b"cam-s"), (H_TS, str(int(time.time() * 1000)).encode()), (H_CONTENT_TYPE, b"image/jpeg")]
    return b"cam-s", jpeg(i), headers


def run_cli(args: list[str], settings: Settings, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)


def refused_cli(args: list[str], settings: Settings, sec) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run a CLI command whose login the broker refuses: (result, failed logins the broker
    logged meanwhile, seconds from the last of them to the command's exit). The latter
    leaves out interpreter start-up, torch imports and model loading, which take
    anything from 2 to 40 s on a loaded 2-core machine; it is what Kafka retries would add to."""
    before = len(sec.failed_login_times())
    done = run_cli(args, settings)
    exited = time.time()
    logins = sec.failed_login_times()[before:]
    return done, len(logins), (exited - logins[-1]) if logins else float("nan")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- SASL_PLAINTEXT ----------------------------------------------------------------------------
def test_frames_are_scored_end_to_end_through_the_sasl_listener(kafka_security, tiny_settings, tiny_bundle_dir, tiny_model, class_folder, tmp_path):
    failed_before = kafka_security.failed_logins()
    settings = fresh_deployment(secured(tiny_settings, kafka_security, "SASL_PLAINTEXT"))  # topics made over SASL
    settings.worker.bundle = tiny_bundle_dir
    worker = WorkerProcess("score-worker", settings, tmp_path / "sasl-worker.log", {"INTERNEG_WORKER__NAME": "scorer-sasl", "HF_HUB_OFFLINE": "1"})
    try:
        assert settings_env(settings)["INTERNEG_KAFKA__SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        worker.wait_ready()
        n = 12
        produce_records(settings, [frame_record(i) for i in range(n)])
        scores = [FrameScore.from_bytes(r.value) for r in read_topic(settings, settings.topics.scores, expect=n, idle_s=0)]
        assert sorted(s.frame_id for s in scores) == sorted(f"f{i}" for i in range(n))
        assert {s.worker for s in scores} == {"scorer-sasl"}
        assert worker.status()["frames_scored"] == n
        # the password never leaves its setting: not in /status, /metrics, the log, or a bundle
        secret = kafka_security.sasl_password
        exposed = {path: urllib.request.urlopen(f"http://127.0.0.1:{worker.port}{path}", timeout=5).read().decode() for path in ("/status", "/metrics")}
        assert worker.terminate() == 0
        exposed["log"] = worker.log_path.read_text(errors="replace")
        bundle = save_bundle(prepare_bundle(tiny_model, class_folder, settings), tmp_path / "bundle")
        exposed.update({str(p): p.read_bytes().decode("latin-1") for p in bundle.iterdir()})
        assert "kafka" not in json.loads((bundle / "manifest.json").read_text())["settings"]
        assert [where for where, text in exposed.items() if secret in text] == []
        assert secret not in repr(settings) and secret not in settings.model_dump_json()
    finally:
        worker.terminate(timeout_s=30)
    assert kafka_security.failed_logins() == failed_before  # every client of the round trip logged in


def test_a_worker_with_a_wrong_password_stops_at_once_with_one_error_line(kafka_security, tiny_settings, tiny_bundle_dir):
    settings = fresh_deployment(secured(tiny_settings, kafka_security, "SASL_PLAINTEXT"))
    settings.worker.bundle = tiny_bundle_dir
    # kafka-python alone would retry the login until bootstrap_timeout_ms (30 s) and then say
    # only "Unable to bootstrap"; a long request timeout shows nothing waits for it either.
    wrong = secured(settings, kafka_security, "SASL_PLAINTEXT", sasl_plain_password="not-" + kafka_security.sasl_password, request_timeout_ms=120000)
    done, attempts, seconds = refused_cli(["score-worker"], wrong, kafka_security)
    print(f"score-worker with a wrong password: exit {done.returncode} {seconds:.2f} s after the broker refused it; {attempts} failed login(s) at the broker")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith(f"error: Kafka authentication failed for user '{kafka_security.sasl_username}' at {kafka_security.sasl_bootstrap} (SASL PLAIN")
    assert "INTERNEG_KAFKA__SASL_PLAIN_PASSWORD" in errors[0]
    assert kafka_security.sasl_password not in done.stderr + done.stdout  # the secret is never echoed
    assert "Traceback" not in done.stderr
    assert 1 <= attempts <= 2  # one login attempt, no retry storm
    assert seconds < 15  # no Kafka retries or timeouts after the refusal: only shutting down


def test_the_topics_command_with_a_wrong_password_fails_at_once(kafka_security, tiny_settings):
    wrong = secured(tiny_settings, kafka_security, "SASL_PLAINTEXT", sasl_plain_password="wrong", request_timeout_ms=120000)
    done, attempts, seconds = refused_cli(["topics"], wrong, kafka_security)
    print(f"topics with a wrong password: exit {done.returncode} {seconds:.2f} s after the broker refused it; {attempts} failed login(s) at the broker")
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(error_lines(done.stderr)) == 1 and "Kafka authentication failed" in error_lines(done.stderr)[0]
    assert 1 <= attempts <= 2
    assert seconds < 15


def test_clients_fail_fast_and_clearly_when_security_settings_do_not_match_the_listener(kafka_security, kafka_bootstrap, tiny_settings):
    sec = kafka_security

    def refused(settings: Settings) -> tuple[Exception, float]:
        started = time.monotonic()
        with pytest.raises(KafkaSecurityError) as caught:
            make_admin(settings.kafka)
        return caught.value, time.monotonic() - started

    good = secured(tiny_settings, sec, "SASL_PLAINTEXT")
    before = sec.failed_logins()
    error, seconds = refused(secured(good, sec, "SASL_PLAINTEXT", sasl_plain_password="wrong"))
    assert isinstance(error, KafkaAuthError) and isinstance(error, ValueError) and seconds < 5
    assert "Invalid username or password" in str(error)
    assert sec.failed_logins() - before == 1
    # a PLAINTEXT client on the SASL port: the broker answers ApiVersions, then hangs up
    error, seconds = refused(secured(good, sec, "PLAINTEXT", bootstrap_servers=sec.sasl_bootstrap))
    assert not isinstance(error, KafkaAuthError) and "expects SASL or TLS" in str(error) and seconds < 5
    # a SASL client on the PLAINTEXT port
    error, seconds = refused(secured(good, sec, "SASL_PLAINTEXT", bootstrap_servers=kafka_bootstrap))
    assert "offers no SASL on this listener" in str(error) and seconds < 5
    error, _ = refused(secured(good, sec, "SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512"))
    assert "does not offer SASL mechanism SCRAM-SHA-512 (it offers PLAIN)" in str(error)
    error, _ = refused(secured(good, sec, "SASL_PLAINTEXT", sasl_mechanism=None))
    assert "needs INTERNEG_KAFKA__SASL_MECHANISM" in str(error)
    # the right credentials pass the same check
    make_admin(good.kafka).close()


def test_an_unreachable_broker_is_left_to_the_clients_own_bootstrap(tiny_settings):
    """The check only judges listeners that answer: a broker not up yet is waited for, as before."""
    from workers.kafka_clients import connection_options
    from workers.kafka_security import check_security

    s = tiny_settings.model_copy(deep=True)
    s.kafka.bootstrap_servers = "127.0.0.1:1"
    started = time.monotonic()
    check_security(s.kafka, connection_options(s.kafka))
    assert time.monotonic() - started < 2


# --- SSL ----------------------------------------------------------------------------------------
@pytest.fixture
def ssl_listener(kafka_security):
    # deploy/setup.sh installs openssl, so a missing listener is a failure, not a skip
    assert kafka_security.ssl_bootstrap is not None, "the broker has no SSL listener: broker.sh found no openssl"
    return kafka_security


def test_records_round_trip_through_the_ssl_listener_with_client_certificates(ssl_listener, tiny_settings):
    settings = fresh_deployment(secured(tiny_settings, ssl_listener, "SSL"))
    sent = produce_records(settings, [frame_record(i) for i in range(5)])
    assert len(sent) == 5
    records = read_topic(settings, settings.topics.frames, expect=5, idle_s=0)
    assert sorted(dict(r.headers)[H_FRAME_ID] for r in records) == sorted(f"f{i}".encode() for i in range(5))


def test_tls_failures_name_their_cause(ssl_listener, kafka_bootstrap, tiny_settings):
    sec = ssl_listener
    good = secured(tiny_settings, sec, "SSL")
    for overrides, phrase in [
        ({"ssl_certfile": None, "ssl_keyfile": None}, "alert"),  # the broker requires a client certificate
        ({"ssl_cafile": None}, "CERTIFICATE_VERIFY_FAILED"),  # the throwaway CA is not trusted by default
        ({"bootstrap_servers": kafka_bootstrap}, "TLS with Kafka at"),  # TLS spoken to a PLAINTEXT port
    ]:
        started = time.monotonic()
        with pytest.raises(KafkaSecurityError, match=phrase):
            make_admin(secured(good, sec, "SSL", **overrides).kafka)
        assert time.monotonic() - started < 5, overrides
    with pytest.raises(KafkaSecurityError, match="expects SASL or TLS"):  # PLAINTEXT spoken to the TLS port
        make_admin(secured(good, sec, "PLAINTEXT", bootstrap_servers=sec.ssl_bootstrap).kafka)


# --- nothing is ever unpickled -------------------------------------------------------------------
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
SCANNED = ("pipeline", "workers", "schemas", "bench", "deploy")


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """'np.load' -> 'numpy.load' through the module's imports; None for other call targets."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return "<absent>"


def pickle_findings(source: str, filename: str) -> list[str]:
    """Every way ``source`` could unpickle: pickle-family imports, torch.load without
    weights_only=True, torch.jit.load, np.load without allow_pickle=False, allow_pickle
    other than False anywhere, pandas' read_pickle."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {a.name}")
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        name = _qualified(node.func, aliases) or ""
        if name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if name in ("torch.jit.load", "pandas.read_pickle") or name.endswith((".read_pickle", ".to_pickle")):
            found.append(f"{where}: {name}")
        if name in ("numpy.load", "numpy.lib.format.read_array") and _keyword(node, "allow_pickle") is not False:
            found.append(f"{where}: {name} without allow_pickle=False")
        if _keyword(node, "allow_pickle") not in ("<absent>", False):
            found.append(f"{where}: allow_pickle={_keyword(node, 'allow_pickle')}")
    return found


def test_the_pickle_scan_finds_what_it_looks_for():
    bad = """
import pickle
import numpy as np, torch
from joblib import load
from numpy import load as npload
torch.load("w.pt")
torch.load("w.pt", weights_only=False)
np.load("x.npy")
npload("x.npz", allow_pickle=True)
np.save("x.npy", a, allow_pickle=True)
torch.jit.load("m.pt")
"""
    found = pickle_findings(bad, "bad.py")
    assert len(found) == 9, found
    good = """
import numpy as np, torch
np.load("x.npz", allow_pickle=False)
torch.load("w.pt", map_location="cpu", weights_only=True)
np.lib.format.write_array(f, a, allow_pickle=False)
"""
    assert pickle_findings(good, "good.py") == []


def test_no_project_source_can_unpickle():
    """No exemptions: the project loads arrays with allow_pickle=False, weights through open_clip (below)."""
    jars = ROOT / "deploy" / "kafka" / "lib"  # Maven's download folder: jars, not project sources
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py")) if jars not in p.parents]
    assert len(files) > 20 and any(p.parts[-2:] == ("pipeline", "bundle.py") for p in files)
    found = [f for p in files for f in pickle_findings(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_weights_files_are_loaded_with_weights_only(tmp_path):
    """open_clip 3.3.0's load_checkpoint -> load_state_dict calls torch.load(..., weights_only=True)
    by default, pipeline/model.py passes weights_only=True explicitly, and torch defaults to it:
    a checkpoint that would run code when unpickled is refused, and its code never runs."""
    import open_clip

    from pipeline.model import ModelLoadError, load_model
    from schemas.settings import ModelSettings

    assert inspect.signature(open_clip.load_checkpoint).parameters["weights_only"].default is True
    assert "weights_only=weights_only" in inspect.getsource(open_clip.factory.load_state_dict)
    assert "weights_only=True" in inspect.getsource(load_model)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": Payload()}}, weights)
    with pytest.raises(ModelLoadError, match="Weights only load failed|weights_only|Unsupported global"):
        load_model(ModelSettings(name="interneg-tiny", pretrained=str(weights), device="cpu"))
    assert not marker.exists()
