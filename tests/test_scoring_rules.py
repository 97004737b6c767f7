"""The scoring worker's rules as pure functions: verdicts and the records a scored batch becomes."""
import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from pipeline.scorers import Scores
from schemas.messages import Candidate, FrameScore, OODAlert, Timings
from pipeline.scorers import judge
from workers.scoring_worker import Frame, Routing, to_outputs


def frame(offset: int) -> Frame:
    record = ConsumerRecord("frames", 2, 0, offset, 0, 0, b"cam", b"jpeg", [], None, 3, 4, -1)
    return Frame(record, f"f{offset}", "cam-1", 1000 + offset)


def routing(candidate_below):
    return Routing(scores_topic="s", alerts_topic="a", candidates_topic="c", threshold=0.5, candidate_below=candidate_below,
                   method="interneg", model_id="m/1", worker="w", class_names=["cat", "dog"])


def test_judge_calls_a_score_below_the_threshold_ood_and_the_threshold_itself_id():
    assert judge(0.49, 0.5) == "ood" and judge(0.5, 0.5) == "id" and judge(0.9, 0.5) == "id"


@pytest.mark.parametrize("candidate_below", [0.35, None])
def test_a_batch_becomes_one_score_per_frame_an_alert_per_ood_frame_and_candidates_only_if_wanted(candidate_below):
    frames = [frame(7), frame(8), frame(9)]
    emb = np.eye(3, 4, dtype=np.float32)
    result = Scores(score=np.array([0.9, 0.4, 0.2]), id_class=np.array([1, 0, 1]), id_prob=np.array([0.8, 0.6, 0.5]))
    explanations = [[], [("rock", 0.3)], [("sea", 0.4), ("rock", 0.2)]]
    out = to_outputs(frames, emb, result, explanations, routing(candidate_below), bank_version=3, bank_size=12, now_ms=5000,
                     timings=Timings(batch_size=3))
    by_topic = {t: [o for o in out if o.topic == t] for t in "sac"}
    assert [o.key for o in by_topic["s"]] == [b"f7", b"f8", b"f9"]
    assert all(o.source is f.record for o, f in zip(by_topic["s"], frames))  # each output names the record it answers
    scores = [FrameScore.from_bytes(o.value) for o in by_topic["s"]]
    assert [s.verdict for s in scores] == ["id", "ood", "ood"]
    assert [s.id_class for s in scores] == ["dog", "cat", "dog"] and scores[0].timings.batch_size == 3
    assert scores[2].source.partition == 2 and scores[2].source.offset == 9 and scores[2].bank_version == 3
    alerts = [OODAlert.from_bytes(o.value) for o in by_topic["a"]]
    assert [a.frame_id for a in alerts] == ["f8", "f9"] and alerts[1].negatives[0].label == "sea"
    assert "timings" not in OODAlert.model_fields  # the alert is its own message, not a score with a flag
    if candidate_below is None:
        assert by_topic["c"] == []
    else:
        candidates = [Candidate.from_bytes(o.value) for o in by_topic["c"]]
        assert [c.frame_id for c in candidates] == ["f9"]
        np.testing.assert_array_equal(candidates[0].embedding.to_numpy(model_id="m/1", dim=4), emb[2])


def test_an_alert_cannot_carry_an_id_verdict():
    with pytest.raises(ValueError):
        OODAlert(frame_id="f", camera_id="c", source={"topic": "t", "partition": 0, "offset": 0}, method="m", score=0.9,
                 threshold=0.5, verdict="id", id_class="cat", id_prob=1.0, bank_version=0, bank_size=0, model_id="m",
                 worker="w", scored_at_ms=0)
