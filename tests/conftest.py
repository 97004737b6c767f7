"""Shared fixtures: the tiny random-weights model, generated images, a prepared bundle."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

from schemas.settings import ModelSettings, Settings  # noqa: E402
from workers.demo import draw_image  # noqa: E402

TINY = ModelSettings(name="interneg-tiny", pretrained="", device="cpu")


@pytest.fixture(scope="session")
def tiny_model():
    from pipeline.model import load_model

    return load_model(TINY)


@pytest.fixture(scope="session")
def class_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    for k, (name, colour, shape) in enumerate(
        [("red_circle", (220, 30, 30), "circle"), ("green square", (30, 200, 40), "square"), ("blue_circle", (30, 40, 220), "circle")]
    ):
        folder = root / name
        folder.mkdir()
        for i in range(3):
            draw_image(folder / f"{i}.png", colour, "ellipse" if shape == "circle" else "rectangle", seed=10 * k + i)
    return root


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory) -> Settings:
    settings = Settings(_env_file=None)
    settings.model = TINY.model_copy()
    settings.cache_dir = tmp_path_factory.mktemp("cache")
    settings.method.num_negatives = 200
    from workers.signing import generate_keypair

    # every deployment of the tests signs and checks its negatives, as deploy/ does
    settings.bank.signing_key, settings.bank.verify_key = generate_keypair(tmp_path_factory.mktemp("keys"))
    return settings


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_model, class_folder, tiny_settings, tmp_path_factory) -> Path:
    from pipeline.bundle import prepare_bundle, save_bundle

    bundle = prepare_bundle(tiny_model, class_folder, tiny_settings)
    return save_bundle(bundle, tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def other_bundle(tiny_model, tiny_settings, tmp_path_factory) -> Path:
    """A bundle for the same tiny model with other classes (yellow square, purple disc)."""
    from pipeline.bundle import prepare_bundle, save_bundle

    root = tmp_path_factory.mktemp("other-classes")
    for k, (name, colour, shape) in enumerate([("yellow_square", (230, 220, 30), "rectangle"), ("purple_disc", (140, 30, 160), "ellipse")]):
        (root / name).mkdir()
        for i in range(3):
            draw_image(root / name / f"{i}.png", colour, shape, seed=100 + 10 * k + i)
    return save_bundle(prepare_bundle(tiny_model, root, tiny_settings), tmp_path_factory.mktemp("bundle-b") / "b")


# --- the real Kafka broker -------------------------------------------------------------
import subprocess  # noqa: E402
import uuid  # noqa: E402

BROKER = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "broker.sh"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory):
    """One single-node KRaft broker for the whole session, started from the Maven jars."""
    subprocess.run(["bash", str(BROKER), "fetch"], check=True, capture_output=True, timeout=600)
    home = tmp_path_factory.mktemp("kafka")
    started = subprocess.run(["bash", str(BROKER), "start", str(home)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    yield started.stdout.strip().splitlines()[-1]
    subprocess.run(["bash", str(BROKER), "stop", str(home)], capture_output=True, timeout=120)


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, so it can be stopped and started again on the same port and data."""
    home = tmp_path / "kafka"

    def start() -> str:
        started = subprocess.run(["bash", str(BROKER), "start", str(home)], capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        return started.stdout.strip().splitlines()[-1]

    def stop() -> None:
        subprocess.run(["bash", str(BROKER), "stop", str(home)], capture_output=True, timeout=120, check=True)

    yield start, stop
    stop()


@pytest.fixture
def stream_settings(kafka_bootstrap, tiny_settings) -> Settings:
    """Settings of a fresh deployment: its own topics and groups on the shared broker."""
    return fresh_deployment(tiny_settings, kafka_bootstrap)


def fresh_deployment(base: Settings, bootstrap: str | None = None) -> Settings:
    """Settings with their own topics (created here, through whatever listener ``base``
    names) and groups, on the broker at ``bootstrap`` (default: ``base``'s)."""
    from workers.topics import ensure_topics

    run = uuid.uuid4().hex[:8]
    settings = base.model_copy(deep=True)
    settings.kafka.bootstrap_servers = bootstrap or base.kafka.bootstrap_servers
    settings.kafka.scoring_group = f"scoring-{run}"
    settings.kafka.inversion_group = f"inversion-{run}"
    settings.kafka.events_group = f"events-{run}"
    settings.kafka.review_group = f"review-{run}"
    settings.kafka.session_timeout_ms = 6000
    for name in ("frames", "scores", "alerts", "candidates", "negatives", "deadletter", "events", "event_state", "control", "cameras"):
        setattr(settings.topics, name, f"{run}.{getattr(settings.topics, name)}")
    settings.topics.partitions = 4
    settings.worker.batch_size = 8
    settings.worker.batch_timeout_ms = 100
    assert set(ensure_topics(settings).values()) == {"created"}
    return settings


@pytest.fixture
def workers(tmp_path):
    """start(command, settings, name): a worker as a real process, stopped (SIGTERM) after the test."""
    from workers.processes import WorkerProcess

    started: list[WorkerProcess] = []

    def start(command: str, settings, name: str) -> WorkerProcess:
        worker = WorkerProcess(command, settings, tmp_path / f"{name}.log", {"INTERNEG_WORKER__NAME": name, "HF_HUB_OFFLINE": "1"})
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.terminate(timeout_s=30)


# --- the session broker's secured listeners (broker.sh writes their details into its DIR) ---
from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True)
class BrokerSecurity:
    """The SASL_PLAINTEXT (PLAIN) and, where openssl was there, SSL listeners of the session broker."""

    home: Path
    sasl_bootstrap: str
    sasl_username: str
    sasl_password: str
    ssl_bootstrap: str | None  # None: broker.sh found no openssl, so there is no SSL listener
    ssl_cafile: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None

    def failed_logins(self) -> int:
        """'Failed authentication with ...' lines the broker has logged so far (all listeners)."""
        return len(self.failed_login_times())

    def failed_login_times(self) -> list[float]:
        """When (epoch seconds, oldest first) the broker logged each failed authentication."""
        from datetime import datetime

        times = []
        for log in (self.home / "logs").glob("server.log*"):
            for line in log.read_text(errors="replace").splitlines():
                if "Failed authentication with" in line:  # "[2026-01-31 12:00:00,123] INFO ... Failed authentication with ..."
                    times.append(datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return sorted(times)


@pytest.fixture(scope="session")
def kafka_security(kafka_bootstrap, tmp_path_factory) -> BrokerSecurity:
    """The session broker's SASL bootstrap and test credentials, and its SSL files, read from its DIR."""
    base = tmp_path_factory.getbasetemp()
    homes = {f.parent.resolve() for f in base.glob("kafka*/bootstrap") if f.read_text().strip() == kafka_bootstrap}
    assert len(homes) == 1, f"the session broker's DIR (bootstrap {kafka_bootstrap}) not found under {base}"
    (home,) = homes
    read = lambda name: (home / name).read_text().strip()  # noqa: E731
    ssl = (home / "ssl.bootstrap").is_file()
    return BrokerSecurity(
        home=home,
        sasl_bootstrap=read("sasl.bootstrap"),
        sasl_username=read("sasl.username"),
        sasl_password=read("sasl.password"),
        ssl_bootstrap=read("ssl.bootstrap") if ssl else None,
        ssl_cafile=str(home / "ssl" / "ca.pem") if ssl else None,
        ssl_certfile=str(home / "ssl" / "client.pem") if ssl else None,
        ssl_keyfile=str(home / "ssl" / "client.key") if ssl else None,
    )
