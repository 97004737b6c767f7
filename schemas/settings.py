"""Every setting of the project in one pydantic-settings tree.

Read from the environment (prefix ``INTERNEG_``, nesting with ``__``, e.g.
``INTERNEG_MODEL__NAME=interneg-tiny``), from a ``.env`` file, or built in code.
Defaults are the constants of METHOD.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.methods import METHOD_NAMES

Method = Literal[METHOD_NAMES]  # the registry's names: a new method is a setting value without touching this file
Profile = Literal["stream", "paper"]

# The paper profile (METHOD §7b): what the released code does where a live deployment wants
# otherwise. Each value is a default under the profile; a setting given explicitly wins.
PAPER_PROFILE: dict[str, dict] = {
    "method": {"lexicon": "paper"},  # the released word files
    "classes": {"prototype_augment": True},  # each example once through RandomResizedCrop + flip
    "model": {"crop_fraction": 224 / 256},  # test images: resize 256, centre-crop 224
    "bank": {"dedup_cos": None},  # no de-duplication of inverted negatives
}


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "interneg"


class ModelSettings(BaseModel):
    name: str = Field("ViT-B-16", description="open_clip architecture name, or an 'hf-hub:org/repo' id")
    pretrained: str = Field(
        "openai",
        description="open_clip pretrained tag, a local weights file, or '' for random weights",
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="'auto' is fp16 on a GPU and fp32 on a CPU"
    )
    seed: int = Field(0, description="seed of the random initialisation when there are no weights")
    crop_fraction: float = Field(
        1.0, gt=0, le=1,
        description="test images: resize the shortest side to crop/crop_fraction, centre-crop (1: open_clip's "
        "resize to the crop; 0.875: the paper's resize 256, crop 224)",
    )
    image_batch_size: int = Field(64, gt=0)
    text_batch_size: int = Field(1024, gt=0)


class ClassesSettings(BaseModel):
    min_examples: int = Field(2, ge=1, description="fewest example images a class folder may have")
    max_examples: int = Field(16, ge=1, description="example images used per class (the paper uses 16)")
    prototype_augment: bool = Field(
        False,
        description="pass each example once through the paper's augmentation (RandomResizedCrop 0.08-1, bicubic, "
        "random flip) instead of the evaluation transform",
    )
    seed: int = 0


class MethodSettings(BaseModel):
    method: Method = "interneg"
    lexicon: Literal["debian", "paper"] = Field(
        "debian", description="candidate words: 'paper' (the released NegLabel/InterNeg word files) or 'debian' (built from wordnet-base)"
    )
    num_negatives: int = Field(2000, gt=0, description="M, words chosen by inter-modal selection")
    groups: int = Field(5, gt=0, description="G for InterNeg")
    neglabel_groups: int = Field(100, gt=0, description="G for NegLabel's own configuration")
    neglabel_fraction: float = Field(0.15, gt=0, le=1)
    neglabel_percentile: float = Field(0.95, gt=0, le=1)
    mcm_temperature: float = Field(1.0, gt=0)
    csp_groups: int = Field(100, gt=0, description="G for CSP")
    csp_seed: int = Field(0, description="seed of the superclass word drawn for each adjective (CSP)")
    adaneg_negatives: int = Field(10_000, gt=0, description="negatives AdaNeg selects")
    adaneg_groups: int = Field(5, gt=0, description="G for AdaNeg")
    adaneg_memory: int = Field(10, ge=2, description="AdaNeg's memory per label: its text and this many images less one")
    adaneg_threshold: float = Field(0.5, gt=0, lt=1, description="AdaNeg's middle score; with adaneg_gap it sets which images are remembered")
    adaneg_gap: float = Field(0.5, ge=0, lt=1, description="remembered: vanilla score above t + gap(1 - t) (ID) or below t - gap t (OOD)")
    adaneg_mix: float = Field(0.1, ge=0, description="weight of the texts-only score (and probabilities) beside the adapted one")
    bundled: list[Method] = Field(
        ["mcm", "neglabel", "adaneg", "interneg"],
        description="methods whose state 'interneg prepare' puts in a bundle; CSP is left out by default because it "
        "encodes ~7 prompts per word (an hour of CPU with ViT-B/16): add it with 'interneg prepare --methods all'",
    )
    beta: float = Field(0.35, description="frames scoring below beta are confidently OOD (inversion candidates)")
    threshold: float = Field(
        0.5, gt=0, allow_inf_nan=False, description="frames scoring below this are judged OOD (every score is above 0, so 0 or less would "
        "silently never alert); 'interneg calibrate' finds one for a target false-alarm rate"
    )
    explain_top: int = Field(3, ge=0, description="negatives shown as a frame's explanation")
    allow_cos: float = Field(
        0.95, gt=0, le=1,
        description="a frame this close (cosine) to an operator's 'normal' entry of its camera is in-distribution, whatever its score",
    )


class InversionSettings(BaseModel):
    enabled: bool = True
    steps: int = Field(10, gt=0)
    lr: float = Field(0.02, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    init_std: float = Field(0.02, gt=0)
    reg_weight: float = Field(0.0, ge=0, description="separation from ID prototypes (off in the paper)")
    seed: int = 0
    max_candidate_age_s: float = Field(
        600.0,
        gt=0,
        description="candidates queued longer than this are skipped unseen: when frames below beta arrive faster "
        "than inversion runs, the backlog stays bounded and the bank learns from recent frames",
    )
    camera_rate: float = Field(
        0.5, gt=0,
        description="candidates inverted per second per camera id, sustained (a token bucket); beyond, they are skipped "
        "and counted: one camera, or a writer forging candidates in its name, cannot fill the bank",
    )
    camera_burst: int = Field(30, gt=0, description="candidates one camera id may have inverted at once before camera_rate applies")
    total_rate: float = Field(
        10.0, gt=0, description="candidates inverted per second over all camera ids, sustained: forged camera ids gain nothing"
    )
    total_burst: int = Field(300, gt=0)


class BankSettings(BaseModel):
    capacity: int = Field(2000, gt=0, description="K_extra, inverted negatives kept")
    dedup_cos: float | None = Field(
        0.95, gt=0, le=1,
        description="a candidate this close to a kept negative is a duplicate; unset (None) keeps every one, "
        "as the released code (the paper profile)",
    )
    signing_key: Path | None = Field(
        None,
        description="Ed25519 private key (PEM, 'interneg keygen') the inversion worker signs negatives and tombstones with",
    )
    verify_key: Path | None = Field(
        None,
        description="Ed25519 public key (PEM) every worker checks negatives against, refusing unsigned and badly signed "
        "ones; unset: the signing key's public half, or, with neither key, negatives are not authenticated (a warning)",
    )


class ImageSettings(BaseModel):
    max_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)
    max_aspect_ratio: float = Field(
        20.0, ge=1, description="longest side over shortest: beyond, the resize to the model's input would explode"
    )


class LiveSettings(BaseModel):
    """Live sources of 'interneg produce': RTSP cameras, HTTP (MJPEG) streams, video devices."""

    jpeg_quality: int = Field(90, ge=1, le=95, description="JPEG quality of each frame sent (Pillow's scale; above 95 only grows the file)")
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="RTP inside the RTSP connection (tcp: no lost packets, passes NAT and firewalls) or beside it (udp)"
    )
    open_timeout_s: float = Field(
        10.0, gt=0, description="connecting to a source, and then finding its stream's codec (it waits for a keyframe), each at most this long"
    )
    read_timeout_s: float = Field(5.0, gt=0, description="a source that sends nothing for this long is lost: reported offline, reconnected")
    reconnect_min_s: float = Field(0.5, gt=0, description="the first delay before reconnecting; it doubles with each failure in a row")
    reconnect_max_s: float = Field(30.0, gt=0, description="the longest delay before reconnecting")
    reconnect_jitter: float = Field(
        0.5, ge=0, le=1,
        description="each delay is shortened by a random fraction up to this, so cameras lost together do not all come back at once",
    )

    @model_validator(mode="after")
    def _delays_ordered(self):
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(f"reconnect_max_s {self.reconnect_max_s} is below reconnect_min_s {self.reconnect_min_s}")
        return self


# Each camera's state holds up to open_frames - 1 alerts waiting to open an event: the bound
# keeps it within a record (pipeline/events.CameraState). A year is longer than any rule means,
# and keeps every period finite in milliseconds.
MAX_OPEN_FRAMES = 100
MAX_RULE_S = 365 * 24 * 3600


class EventRules(BaseModel):
    """How a camera's OOD frames become events (issue 14); per camera in the cameras file."""

    model_config = ConfigDict(extra="forbid")
    open_frames: int = Field(3, ge=1, le=MAX_OPEN_FRAMES, description="OOD frames within open_window_s that open an event")
    open_window_s: float = Field(10.0, gt=0, le=MAX_RULE_S, description="the window open_frames must fall in")
    quiet_s: float = Field(30.0, gt=0, le=MAX_RULE_S, description="an event closes after this long without an OOD frame")
    cooldown_s: float = Field(60.0, ge=0, le=MAX_RULE_S, description="after an event closes, the camera's OOD frames open nothing for this long")
    update_every_s: float = Field(10.0, gt=0, le=MAX_RULE_S, description="an open event that changed is told again at most this often")


class CameraSettings(BaseModel):
    """One camera's own settings (the cameras file, ``interneg cameras apply``); what is left
    out is the workers' setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold: float | None = Field(None, gt=0, allow_inf_nan=False, description="frames scoring below this are OOD, for this camera")
    method: Method | None = Field(
        None, description="the method scoring this camera, from those the bundle carries (set its threshold too: scales differ); "
        "it makes no inversion candidates, the bank being the workers' method's"
    )
    bundle: str | None = Field(
        None, max_length=4096,
        description="a bundle of this camera's own known classes, at a path the scoring workers see, prepared with the "
        "workers' model (the frame is encoded once); like a camera's own method, it makes no inversion candidates",
    )
    roi: tuple[float, float, float, float] | None = Field(
        None, description="region of interest: x0, y0, x1, y1 as fractions of the frame; only it is scored"
    )
    events: EventRules | None = None

    @model_validator(mode="after")
    def _roi_inside_the_frame(self):
        if self.roi is not None:
            x0, y0, x1, y1 = self.roi
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"roi must be x0, y0, x1, y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {list(self.roi)}")
        return self


class TopicSettings(BaseModel):
    frames: str = "frames"
    scores: str = "ood.scores"
    alerts: str = "ood.alerts"
    candidates: str = "ood.candidates"
    negatives: str = "ood.negatives"
    deadletter: str = "ood.deadletter"
    events: str = Field("ood.events", description="per camera: OOD events (opened/updated/closed), written by the events worker only")
    cameras: str = Field("ood.cameras", description="per camera: a live source went offline or came back (written by 'interneg produce')")
    event_state: str = Field("ood.events.state", description="compacted: the events worker's per-camera state, so a restart or rebalance resumes it")
    control: str = Field("ood.control", description="compacted: what operators tell running workers (per-camera settings, 'normal' feedback)")
    partitions: int = Field(6, gt=0, description="partitions of the frames, scores, alerts and candidates topics")
    replication_factor: int = Field(1, gt=0)
    retention_ms: int = Field(7 * 24 * 3600 * 1000, description="retention of every topic but the compacted negatives")


class KafkaSettings(BaseModel):
    model_config = ConfigDict(validate_assignment=True)  # a password assigned in code becomes a SecretStr too

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "interneg"
    scoring_group: str = "interneg-scoring"
    inversion_group: str = "interneg-inversion"
    events_group: str = "interneg-events"
    review_group: str = "interneg-review"
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=0, description="broker, topics, producers and consumers alike")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None  # shown as '**********' in every dump, log and repr
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    request_timeout_ms: int = 30000
    connect_timeout_ms: int = Field(
        10000, gt=0,
        description="a process's first contact with these bootstrap servers gives up after this (one error line, exit "
        "2); once reached, a lost broker is waited for as the Kafka client does (30 s per new client, retries without end)",
    )
    session_timeout_ms: int = 10000
    max_poll_interval_ms: int = Field(300000, description="a batch must finish within this, or the worker leaves its group")
    transaction_timeout_ms: int = Field(
        30000, gt=0, description="exactly-once mode: the broker aborts a dead worker's open transaction after this"
    )


class WorkerSettings(BaseModel):
    bundle: Path | None = Field(None, description="detector bundle directory")
    batch_size: int = Field(32, gt=0, description="frames per batch, at most")
    batch_timeout_ms: int = Field(200, gt=0, description="a batch closes after this long even if not full")
    decode_threads: int = Field(2, gt=0)
    gpu_decode: bool = Field(True, description="decode JPEG frames with nvJPEG when the model runs on a GPU")
    http_host: str = "127.0.0.1"
    http_port: int = Field(0, ge=0, description="metrics and health endpoints; 0 picks a free port")
    metrics_cameras: int = Field(
        50, ge=0, description="cameras that get their own metric label; the rest count as 'other' (camera ids come from records)"
    )
    name: str = Field("", description="worker name in logs and records; default host-pid")
    events_max_cameras: int = Field(
        5000, gt=0, description="cameras whose event state one events worker holds; past it, those heard from least "
        "recently are forgotten (camera ids come from records; each camera holds up to open_frames alerts)"
    )
    inversion_batch_size: int = Field(16, gt=0)
    stall_after_s: float = Field(
        60.0,
        ge=5.0,
        description="liveness bound: a worker that owns partitions with records waiting and commits nothing for this "
        "long is stalled; it says so (log, /readyz, interneg_worker_stalled) and renews its Kafka consumer. "
        "Keep it above the longest batch",
    )
    exactly_once: bool = Field(
        False,
        description="consume-score-produce in Kafka transactions; readers use isolation_level=read_committed. "
        "Give each worker a stable name: its transactional id is derived from it",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INTERNEG_", env_nested_delimiter="__", env_file=".env", extra="ignore",
        env_parse_none_str="null",  # INTERNEG_BANK__DEDUP_COS=null: no de-duplication (unset would mean the default)
    )

    profile: Profile = Field(
        "stream",
        description="'paper': the paper's protocol as the released code runs it (PAPER_PROFILE); 'stream': the "
        "deployment defaults",
    )
    model: ModelSettings = ModelSettings()
    classes: ClassesSettings = ClassesSettings()
    method: MethodSettings = MethodSettings()
    inversion: InversionSettings = InversionSettings()
    bank: BankSettings = BankSettings()
    images: ImageSettings = ImageSettings()
    live: LiveSettings = LiveSettings()
    topics: TopicSettings = TopicSettings()
    kafka: KafkaSettings = KafkaSettings()
    worker: WorkerSettings = WorkerSettings()
    events: EventRules = EventRules()
    cache_dir: Path = Field(default_factory=_default_cache_dir)

    @model_validator(mode="before")
    @classmethod
    def _profile_defaults(cls, data):
        """Under the paper profile, PAPER_PROFILE's values become the defaults of their sections."""
        if not isinstance(data, dict) or data.get("profile") != "paper":
            return data
        data = dict(data)
        for section, defaults in PAPER_PROFILE.items():
            given = data.get(section) or {}
            if isinstance(given, BaseModel):
                given = given.model_dump(exclude_unset=True)
            data[section] = {**defaults, **given}
        return data
