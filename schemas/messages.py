"""The wire contract: every message that crosses a process boundary.

Values are JSON (UTF-8) of these pydantic models; vectors travel as base64 bytes with a
declared dtype, dimension and model id, and are validated on read. Nothing is pickled.
Each model carries ``version``; a reader refuses versions it does not know.
"""
from __future__ import annotations

import base64
import math
from typing import Annotated, Literal

import numpy as np
from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, model_validator

from schemas.settings import CameraSettings

SCHEMA_VERSION = 1

# Frame headers (topic `frames`): bytes values, UTF-8.
H_FRAME_ID = "frame-id"
H_CAMERA_ID = "camera-id"
H_TS = "ts"  # milliseconds since the epoch, decimal
H_CONTENT_TYPE = "content-type"
CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")

# Dead-letter headers: the original key, value and headers are kept, these are added.
H_DL_REASON = "x-dl-reason"
H_DL_DETAIL = "x-dl-detail"
H_DL_TOPIC = "x-dl-source-topic"
H_DL_PARTITION = "x-dl-source-partition"
H_DL_OFFSET = "x-dl-source-offset"
H_DL_WORKER = "x-dl-worker"
H_DL_TRUNCATED = "x-dl-truncated"  # what of the original did not fit: "value 16777000 -> 16760000 bytes; headers dropped"

# Negatives header (topic `ood.negatives`): the inversion worker's Ed25519 signature (workers/signing.py).
H_SIGNATURE = "x-signature"


# A frame or camera id as it travels in JSON: what parse_frame accepts from a frame's headers,
# so a record carrying a longer one was not written by a scoring worker (and the inversion
# worker would fail to carry it into a negative's origin).
MAX_ID_LENGTH = 256
Identifier = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
# Milliseconds since the epoch as a Kafka timestamp and a database BIGINT hold them: a larger
# one read from a record would stop whoever stores it (SQLite raises OverflowError).
MAX_MS = 2**63 - 1
Millis = Annotated[int, Field(ge=0, le=MAX_MS)]


def _all_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes):
        return cls.model_validate_json(data)


class Vector(BaseModel):
    """A float vector as bytes, with what is needed to check it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dtype: Literal["float32", "float16"]
    dim: int = Field(gt=0, le=65536)
    model_id: str = Field(min_length=1)
    data: Base64Bytes

    @model_validator(mode="after")
    def _size_matches(self):
        expected = self.dim * np.dtype(self.dtype).itemsize
        if len(self.data) != expected:
            raise ValueError(f"vector data has {len(self.data)} bytes, {self.dtype}[{self.dim}] needs {expected}")
        values = np.frombuffer(self.data, dtype=self.dtype)
        if not np.isfinite(values).all():
            raise ValueError("vector contains NaN or infinite values")
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray, model_id: str, dtype: Literal["float32", "float16"] = "float32") -> "Vector":
        a = np.ascontiguousarray(array, dtype=dtype).reshape(-1)
        return cls(dtype=dtype, dim=a.shape[0], model_id=model_id, data=base64.b64encode(a.tobytes()))

    def to_numpy(self, *, model_id: str, dim: int) -> np.ndarray:
        """The vector as float32, refusing another model's or another width."""
        if self.model_id != model_id:
            raise ValueError(f"vector made with model {self.model_id}, expected {model_id}")
        if self.dim != dim:
            raise ValueError(f"vector has dimension {self.dim}, expected {dim}")
        return np.frombuffer(self.data, dtype=self.dtype).astype(np.float32)


class SourceRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    topic: str
    partition: int = Field(ge=0, lt=2**31)  # as Kafka holds them: a reader seeks there (the recorder does)
    offset: int = Field(ge=0, le=MAX_MS)


class WeighedNegative(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str
    cos: float


class Timings(BaseModel):
    """Per-frame share of the batch's stages, milliseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    decode_ms: float = 0.0
    encode_ms: float = 0.0
    score_ms: float = 0.0
    batch_ms: float = 0.0  # the whole batch, poll to produce
    batch_size: int = 0


class JudgedFrame(Message):
    """What every record about a scored frame says: the frame, where it came from, its score
    and nearest known class, the negatives that weighed most, and who scored it with what."""

    frame_id: Identifier
    camera_id: Identifier
    ts_ms: Millis | None = None  # when the camera took it (header), if given
    source: SourceRef
    method: str
    score: float
    threshold: float
    id_class: str  # the nearest known class
    id_prob: float
    negatives: list[WeighedNegative] = []
    bank_version: int
    bank_size: int
    model_id: str
    worker: str
    scored_at_ms: Millis


class FrameScore(JudgedFrame):
    """Topic ``ood.scores``, keyed by frame id: every scored frame, with its timings."""

    verdict: Literal["id", "ood"]
    allowed_by: str | None = None  # the allow-list entry that made an OOD score in-distribution (an operator's "normal")
    timings: Timings = Timings()


class OODAlert(JudgedFrame):
    """Topic ``ood.alerts``, keyed by frame id: a frame judged OOD, what an operator acts on.
    Its own type, not a score with a flag: its verdict can only be "ood", and it has no timings."""

    verdict: Literal["ood"] = "ood"
    embedding: Vector | None = None  # float16: what an event's "normal" verdict allow-lists (issue 14)

    @model_validator(mode="after")
    def _finite(self):
        # the events worker orders frames by score and keeps them in its state: NaN orders
        # nothing, and JSON writes NaN and infinity as null, which no reader takes back
        if not _all_finite(self.score, self.threshold, self.id_prob, *(n.cos for n in self.negatives)):
            raise ValueError("score, threshold, id_prob and the negatives' cos must be finite")
        return self


class OODEvent(Message):
    """Topic ``ood.events``, keyed by camera id: frames judged OOD, grouped per camera into an
    event that is opened once, updated while it goes on, and closed after a quiet period."""

    type: Literal["ood"] = "ood"
    event_id: Identifier
    camera_id: Identifier
    status: Literal["opened", "updated", "closed"]
    start_ms: Millis
    end_ms: Millis  # the last OOD frame so far (the event's end once closed)
    frames: int = Field(ge=1, le=MAX_MS)  # OOD frames in the event
    peak_score: float  # the lowest score: the most out-of-distribution frame
    best_frame_id: Identifier
    best_source: SourceRef  # where the best frame's bytes are, for its snapshot
    id_class: str  # the nearest known class of the best frame
    negatives: list[WeighedNegative] = []  # the negatives that fired most over the event, cos = their best
    threshold: float
    method: str
    embedding: Vector | None = None  # the best frame's embedding: what a "normal" verdict allow-lists
    emitted_ms: Millis

    @model_validator(mode="after")
    def _finite(self):
        # stored as DOUBLE PRECISION NOT NULL (NaN is NULL there) and served as strict JSON
        if not _all_finite(self.peak_score, self.threshold, *(n.cos for n in self.negatives)):
            raise ValueError("peak_score, threshold and the negatives' cos must be finite")
        return self


class CameraStatus(Message):
    """Topic ``ood.cameras``, keyed by camera id: a live source went offline or came back."""

    type: Literal["camera"] = "camera"
    camera_id: Identifier
    status: Literal["offline", "online"]
    since_ms: Millis
    detail: str = Field("", max_length=1024)
    emitted_ms: Millis


class AllowEntry(Message):
    """Topic ``ood.control`` (compacted), keyed ``allow:<entry id>``; a null value withdraws it.
    An operator said a frame is normal: frames this close to its embedding are in-distribution."""

    kind: Literal["allow"] = "allow"
    entry_id: Identifier
    camera_id: Identifier | None = None  # None: every camera
    embedding: Vector
    event_id: Identifier | None = None  # the reviewed event it came from
    note: str = Field("", max_length=1024)
    by: str = Field("", max_length=MAX_ID_LENGTH)
    added_ms: int


class CameraConfig(Message):
    """Topic ``ood.control`` (compacted), keyed ``camera:<camera id>``: one camera's settings,
    as the operator's cameras file last said; a null value returns it to the workers' settings."""

    kind: Literal["camera"] = "camera"
    camera_id: Identifier
    settings: CameraSettings
    source: str = Field("", max_length=1024)  # the file it came from
    by: str = Field("", max_length=MAX_ID_LENGTH)
    applied_ms: int


class BundleRollout(Message):
    """Topic ``ood.control``, keyed ``bundle``: the detector bundle every scoring worker should
    run, named by its path (as the workers see it) and the sha256 of its manifest, which
    records the sha256 of every file: a worker loads only the bundle it was told of."""

    kind: Literal["bundle"] = "bundle"
    path: str = Field(min_length=1, max_length=4096)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    by: str = Field("", max_length=MAX_ID_LENGTH)
    applied_ms: int


class Candidate(Message):
    """Topic ``ood.candidates``: a confidently-OOD frame's embedding, for inversion."""

    frame_id: Identifier
    camera_id: Identifier
    source: SourceRef
    score: float
    embedding: Vector
    created_ms: int


class NegativeRecord(Message):
    """Topic ``ood.negatives`` (compacted), keyed by negative id; a null value is a tombstone."""

    id: int = Field(ge=0, lt=2**63)  # FAISS ids are int64
    vector: Vector
    deviation: float = Field(allow_inf_nan=False)
    origin: str = Field(max_length=MAX_ID_LENGTH)  # the frame id it was inverted from
    created: float = Field(allow_inf_nan=False)  # unix seconds
    nearest_words: list[str] = Field(default=[], max_length=16)
