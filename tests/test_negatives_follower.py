"""NegativeFollower.apply without a broker: a malformed record is rejected and counted, never
raised (it must not stop a worker); a bug in the follower's own computation is raised."""
import numpy as np
import pytest

import workers.negatives
from pipeline.bank import FIRST_INVERTED_ID, NegativeBank
from schemas.messages import NegativeRecord, Vector
from schemas.settings import KafkaSettings
from workers.negatives import NegativeCheck, NegativeFollower

DIM = 4
MODEL = "m/1"
E = np.eye(DIM, dtype=np.float32)
ID = FIRST_INVERTED_ID + 1


class NoBroker:
    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, partitions):
        pass

    def seek_to_beginning(self, *partitions):
        pass


def follower(monkeypatch, prototypes=E[:1]) -> NegativeFollower:
    monkeypatch.setattr(workers.negatives, "make_consumer", lambda *args, **kwargs: NoBroker())
    bank = NegativeBank(np.zeros((0, DIM), np.float32), [], capacity=10)
    # one ID class: a vector is admissible while its cosine to the prototype stays below 0.3
    check = NegativeCheck(prototypes, np.array([0.3], np.float32))
    return NegativeFollower(KafkaSettings(), "ood.negatives", bank, MODEL, check=check)


def record(vector, id=ID, model_id=MODEL) -> bytes:
    vector = Vector.from_numpy(np.asarray(vector, np.float32), model_id)
    return NegativeRecord(id=id, vector=vector, deviation=0.0, origin="frame-1", created=1.0).to_bytes()


def test_malformed_records_are_rejected_and_counted(monkeypatch):
    f = follower(monkeypatch)
    key = str(ID).encode()
    malformed = [
        (b"not-an-id", record(E[1])),
        (key, b"not json"),
        (key, record(E[1], model_id="other/2")),
        (key, record(E[1, :3])),  # another width
        (key, record(E[0])),  # inadmissible: the ID prototype itself
        (key, record(2 * E[1])),  # not a unit vector
        (str(ID + 1).encode(), record(E[1])),  # the key names another negative
        (b"5", record(E[1], id=5)),  # a static negative's id
    ]
    for k, v in malformed:
        f.apply(k, v)
    assert (f.rejected, f.applied, len(f.bank.entries)) == (len(malformed), 0, 0)
    f.apply(key, record(E[1]))
    assert (f.applied, list(f.bank.entries)) == (1, [ID])


def test_a_bug_in_the_follower_is_raised_not_counted(monkeypatch):
    f = follower(monkeypatch, prototypes=np.eye(8, dtype=np.float32)[:1])  # a width no vector of this bank has
    with pytest.raises(ValueError):
        f.apply(str(ID).encode(), record(E[1]))
    assert f.rejected == 0
