"""The negative bank: bound, ranking, de-duplication, provenance, persistence, explanations."""
import numpy as np
import pytest

from pipeline.bank import FIRST_INVERTED_ID, InvertedNegative, NegativeBank

D = 8


def unit_rows(n, seed):
    x = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_bank(capacity=3, dedup=0.95):
    static = np.eye(D, dtype=np.float32)[:2]
    return NegativeBank(static, ["alpha", "beta"], capacity=capacity, dedup_cos=dedup)


def test_bound_and_ranking_by_deviation():
    bank = make_bank(capacity=3)
    vecs = unit_rows(5, 0)
    degrees = [0.2, 0.5, 0.1, 0.4, 0.3]
    decisions = [bank.offer(v, d, f"frame-{i}", created=100.0 + i) for i, (v, d) in enumerate(zip(vecs, degrees))]
    assert [d.accepted for d in decisions] == [True, True, True, True, True]
    assert decisions[3].evicted == (FIRST_INVERTED_ID + 2,)  # 0.1 goes when 0.4 arrives
    assert decisions[4].evicted == (FIRST_INVERTED_ID,)  # then 0.2 when 0.3 arrives
    assert len(bank.entries) == 3
    assert [bank.entries[i].deviation for i in bank.ranked_ids()] == [0.5, 0.4, 0.3]
    assert [bank.entries[i].origin for i in bank.ranked_ids()] == ["frame-1", "frame-3", "frame-4"]
    below = bank.offer(unit_rows(1, 9)[0], 0.25, "late")
    assert not below.accepted and "bound" in below.reason
    # the scoring matrix: static first, then inverted by rank
    m = bank.matrix()
    assert m.shape == (5, D)
    np.testing.assert_array_equal(m[2], vecs[1])
    np.testing.assert_array_equal(m[4], vecs[4])


def test_put_keeps_the_bound_and_says_what_it_evicted():
    """What a replica applies, whatever order or number of records a writer sent: the bank
    never holds more than its capacity, and the same entries go whoever applies them."""
    bank = make_bank(capacity=2)
    vecs = unit_rows(4, 5)
    put = lambda k, dev: bank.put(InvertedNegative(FIRST_INVERTED_ID + k, dev, f"o{k}", 0.0), vecs[k])  # noqa: E731
    assert put(0, 0.3) == () and put(1, 0.1) == ()
    assert put(2, 0.2) == (FIRST_INVERTED_ID + 1,)  # 0.1 ranks last
    assert put(3, 0.05) == (FIRST_INVERTED_ID + 3,)  # below the bound: in and out at once
    assert bank.ranked_ids() == [FIRST_INVERTED_ID, FIRST_INVERTED_ID + 2]
    assert put(2, 0.2) == ()  # replacing an entry in place evicts nothing


def test_near_duplicates_of_any_negative_are_refused():
    bank = make_bank(dedup=0.95)
    v = unit_rows(1, 1)[0]
    assert bank.offer(v, 0.3, "a").accepted
    close = v + 0.01 * unit_rows(1, 2)[0]
    refused = bank.offer(close, 0.9, "b")
    assert not refused.accepted and "near-duplicate of inverted#" in refused.reason
    refused_static = bank.offer(np.eye(D)[0] + 0.01, 0.9, "c")
    assert not refused_static.accepted and "alpha" in refused_static.reason
    assert len(bank.entries) == 1


def test_ties_rank_by_id_so_replicas_agree():
    a, b = make_bank(capacity=5), make_bank(capacity=5)
    vecs = unit_rows(3, 3)
    entries = [InvertedNegative(FIRST_INVERTED_ID + i, 0.5, f"f{i}", 1.0) for i in range(3)]
    for e, v in zip(entries, vecs):
        a.put(e, v)
    for e, v in reversed(list(zip(entries, vecs))):
        b.put(e, v)
    assert a.ranked_ids() == b.ranked_ids() == [FIRST_INVERTED_ID, FIRST_INVERTED_ID + 1, FIRST_INVERTED_ID + 2]
    assert a.digest() == b.digest()
    b.remove(FIRST_INVERTED_ID + 1)
    assert a.digest() != b.digest()


def test_save_load_round_trip(tmp_path):
    bank = make_bank(capacity=4)
    for i, v in enumerate(unit_rows(3, 4)):
        bank.offer(v, 0.1 * (i + 1), f"frame-{i}", created=7.0)
    bank.save(tmp_path / "bank.npz")
    again = NegativeBank.load(tmp_path / "bank.npz")
    assert again.digest() == bank.digest()
    assert again.entries == bank.entries
    assert again.to_bytes() == bank.to_bytes()
    # ids keep counting after a reload
    assert again.offer(unit_rows(1, 5)[0], 0.9, "new").id == FIRST_INVERTED_ID + 3


def test_equal_banks_serialise_to_identical_bytes_whatever_their_history(tmp_path):
    vecs = unit_rows(6, 11)
    entries = [InvertedNegative(FIRST_INVERTED_ID + i, 0.1 * (i + 1), f"f{i}", 5.0 + i, ("alpha",)) for i in range(6)]
    live = make_bank(capacity=3)  # what an inversion worker holds: puts with evictions along the way
    for e, v in zip(entries, vecs):
        live.put(e, v)
        for evicted in live.ranked_ids()[3:]:
            live.remove(evicted)
    replayed = make_bank(capacity=3)  # a fresh replica after compaction: only the survivors, in another order
    for i in (5, 3, 4):
        replayed.put(entries[i], vecs[i])
    assert live.version != replayed.version
    assert live.to_bytes() == replayed.to_bytes()
    assert live.sha256() == replayed.sha256()
    replayed.remove(FIRST_INVERTED_ID + 4)
    assert live.sha256() != replayed.sha256()  # the cached hash follows changes
    live.save(tmp_path / "a.npz")
    assert NegativeBank.load(tmp_path / "a.npz").sha256() == live.sha256()


def test_explain_returns_the_closest_negatives_with_labels():
    bank = make_bank()
    bank.offer(unit_rows(1, 6)[0], 0.3, "frame-x")
    query = np.eye(D, dtype=np.float32)[:1]
    (top,) = bank.explain(query, 2)
    assert top[0] == ("alpha", pytest.approx(1.0))
    assert len(top) == 2
    assert bank.entries[FIRST_INVERTED_ID].nearest_words  # provenance carries nearest words


def test_wrong_dimension_is_refused():
    with pytest.raises(ValueError, match="dimension 4"):
        make_bank().put(InvertedNegative(FIRST_INVERTED_ID, 0.1, "x", 0.0), np.ones(4))


def test_offer_with_a_stable_id_is_idempotent():
    bank = make_bank(capacity=3)
    v = unit_rows(1, 11)[0]
    first = bank.offer(v, 0.4, "frame-9", id=FIRST_INVERTED_ID + 99)
    again = bank.offer(unit_rows(1, 12)[0], 0.9, "frame-9", id=FIRST_INVERTED_ID + 99)
    assert first.accepted and first.id == FIRST_INVERTED_ID + 99
    assert not again.accepted and again.reason == "already in the bank"
    assert len(bank.entries) == 1
    np.testing.assert_allclose(bank.matrix()[-1], v, atol=1e-7)


def test_without_de_duplication_exact_copies_are_kept_as_the_released_code_keeps_them(tmp_path):
    bank = make_bank(dedup=None)
    v = unit_rows(1, 1)[0]
    assert bank.offer(v, 0.3, "a").accepted and bank.offer(v, 0.4, "b").accepted
    assert bank.offer(np.eye(D)[0], 0.2, "c").accepted  # a copy of a static negative too
    assert len(bank.entries) == 3
    bank.save(tmp_path / "bank.npz")
    assert NegativeBank.load(tmp_path / "bank.npz").dedup_cos is None


def test_the_bank_can_be_read_from_another_thread_while_it_changes():
    """A worker's /status reads the bank from its HTTP thread while the main thread applies
    negatives; unguarded, the reads failed mid-update (/status answered 500)."""
    import threading
    import time

    bank = make_bank(capacity=50, dedup=None)
    vecs = unit_rows(200, 3)
    errors, stop = [], threading.Event()

    def change():
        i = 0
        while not stop.is_set():
            decision = bank.offer(vecs[i % 200], float(i % 97), f"f{i}")
            if decision.accepted and i % 3 == 0:
                bank.remove(decision.id)
            i += 1

    writer = threading.Thread(target=change)
    writer.start()
    deadline = time.monotonic() + 2.0
    reads = 0
    while time.monotonic() < deadline:
        try:
            bank.ranked_ids(), bank.digest(), bank.sha256(), bank.matrix()
            reads += 1
        except Exception as exc:  # noqa: BLE001 - any failure of a read is the defect
            errors.append(repr(exc))
    stop.set()
    writer.join()
    assert reads > 10 and errors == []
