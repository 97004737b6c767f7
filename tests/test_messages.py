"""The wire contract: round trips, and refusals of malformed vectors and versions."""
import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from schemas.messages import Candidate, FrameScore, NegativeRecord, Vector


def test_vector_round_trip_is_byte_exact_and_checked():
    v = np.random.default_rng(0).normal(size=64).astype(np.float32)
    record = NegativeRecord(id=7, vector=Vector.from_numpy(v, "m/1"), deviation=0.25, origin="frame-1", created=1.5)
    again = NegativeRecord.from_bytes(record.to_bytes())
    assert again == record
    assert again.vector.to_numpy(model_id="m/1", dim=64).tobytes() == v.tobytes()
    with pytest.raises(ValueError, match="made with model m/1, expected m/2"):
        again.vector.to_numpy(model_id="m/2", dim=64)
    with pytest.raises(ValueError, match="dimension 64, expected 32"):
        again.vector.to_numpy(model_id="m/1", dim=32)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dim": 3}, "needs 12"),
        ({"dtype": "float64"}, "dtype"),
        ({"data": base64.b64encode(np.array([np.nan, 1, 2, 3], np.float32).tobytes()).decode()}, "NaN"),
        ({"model_id": ""}, "model_id"),
    ],
)
def test_malformed_vectors_are_refused(change, message):
    good = json.loads(Vector.from_numpy(np.ones(4, np.float32) / 2, "m").model_dump_json())
    with pytest.raises(ValidationError, match=message):
        Vector.model_validate({**good, **change})


def test_unknown_versions_and_fields_are_refused():
    payload = {
        "frame_id": "f", "camera_id": "c", "source": {"topic": "t", "partition": 0, "offset": 1}, "score": 0.1,
        "embedding": json.loads(Vector.from_numpy(np.ones(4) / 2, "m").model_dump_json()), "created_ms": 0,
    }
    assert Candidate.model_validate(payload).version == 1
    with pytest.raises(ValidationError, match="version"):
        Candidate.model_validate({**payload, "version": 2})
    with pytest.raises(ValidationError, match="extra"):
        Candidate.model_validate({**payload, "pickle": "no"})
    with pytest.raises(ValidationError):
        FrameScore.from_bytes(b"not json")


def test_ids_in_scores_and_candidates_are_bounded_as_a_frames_headers_are():
    """Found by the generated hostile records: a candidate with a 257-character frame id was
    read, inverted, and then crashed the inversion worker making the negative's origin."""
    import pydantic

    from schemas.messages import MAX_ID_LENGTH, Candidate

    good = dict(camera_id="cam", source={"topic": "frames", "partition": 0, "offset": 1}, score=0.1, created_ms=0,
                embedding=Vector.from_numpy(np.ones(4, np.float32) / 2, "m"))
    assert Candidate(frame_id="x" * MAX_ID_LENGTH, **good).frame_id
    for bad in ("x" * (MAX_ID_LENGTH + 1), "中" * 300, ""):
        with pytest.raises(pydantic.ValidationError):
            Candidate(frame_id=bad, **good)
