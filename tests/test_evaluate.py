"""The evaluator's protocols, on a scripted scorer and on simulated features."""
import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.evaluate import Protocol, evaluate, run_stream, write_report
from pipeline.scorers import AdaptStats, Scorer, Scores


class ScriptedScorer(Scorer):
    """Scores 0 until it has applied any proposal, then 1; records when things happen."""

    name = "scripted"

    def __init__(self):
        self.calls, self.applied = [], 0

    def score(self, image_emb):
        self.calls.append(("score", len(image_emb), self.applied))
        value = 1.0 if self.applied else 0.0
        n = len(image_emb)
        return Scores(np.full(n, value), np.zeros(n, int), np.ones(n))

    def propose(self, image_emb, scores, origins, stats=None):
        return [origins[0]]

    def apply(self, proposals, stats=None):
        self.calls.append(("apply", list(proposals)))
        self.applied += len(proposals)
        return len(proposals)

    def reset(self):
        self.applied = 0


def test_paper_protocol_rescores_the_triggering_batch():
    scorer = ScriptedScorer()
    scores = run_stream(scorer, np.zeros((5, 2)), [str(i) for i in range(5)], Protocol("paper", batch_size=2), AdaptStats())
    assert (scores == 1.0).all()  # every batch was re-scored after its own update
    assert [c[0] for c in scorer.calls] == ["score", "apply", "score"] * 3


def test_async_protocol_applies_after_the_delay_and_never_rescores():
    scorer = ScriptedScorer()
    features = np.zeros((8, 2))
    origins = [f"f{i}" for i in range(8)]
    order = np.random.default_rng(0).permutation(8)
    scores = run_stream(scorer, features, origins, Protocol("async", batch_size=2, delay=2), AdaptStats())
    kinds = [c[0] for c in scorer.calls]
    assert kinds == ["score", "score", "apply", "score", "apply", "score"]
    # batch 0's proposal is applied just before batch 2
    assert scorer.calls[2] == ("apply", [origins[order[0]]])
    # batches 0 and 1 saw an empty bank; 2 and 3 did not
    np.testing.assert_array_equal(scores[order], [0, 0, 0, 0, 1, 1, 1, 1])


def test_protocol_settings_are_validated():
    with pytest.raises(ConfigError, match="delay"):
        Protocol("async", delay=0)
    with pytest.raises(ConfigError, match="batch size"):
        Protocol(batch_size=0)


def test_simulated_evaluation_resets_the_bank_per_set_and_writes_plots(tmp_path):
    from pipeline.bundle import load_bundle
    from pipeline.features import load_features
    from pipeline.methods import scorer_from_bundle
    from pipeline.simulate import SimulatedInverter, SimulationParams, write_simulation
    from schemas.settings import Settings

    settings = Settings(_env_file=None)
    params = SimulationParams(n_id_images=600, n_ood_per_set=300, n_lexicon_nouns=3000, n_lexicon_adjectives=500)
    write_simulation(params, tmp_path, settings)
    bundle = load_bundle(tmp_path / "bundle")
    inverter = SimulatedInverter(bundle.extras["modality_gap"], text_mean=bundle.extras["text_mean"])
    methods = ("mcm", "neglabel", "csp", "adaneg", "interneg")
    scorers = {m: scorer_from_bundle(bundle, settings, m, inverter) for m in methods}
    id_features = load_features(tmp_path / "id.npz")[0]
    ood = {name: load_features(tmp_path / f"{name}.npz")[0] for name in ("near", "far")}
    report = evaluate(scorers, id_features, ood, Protocol(batch_size=128))
    assert [(r.method, r.ood_set) for r in report.results] == [
        (m, s) for m in methods for s in ("near", "far")
    ]
    for r in report.results:
        assert 0 <= r.metrics["auroc"] <= 1
        if r.method == "interneg":
            assert 0 < r.adapt["admitted"] == r.bank_size  # the bank started empty for this set
        elif r.method == "adaneg":
            assert 0 < r.adapt["admitted"] <= r.adapt["candidates"] and r.bank_size == 0  # memory writes, no bank growth
        else:
            assert r.adapt["candidates"] == 0
            assert r.bank_size == 0
    written = write_report(report, tmp_path / "out")
    assert {p.name for p in written} >= {"metrics.json", "roc_interneg.png", "hist_mcm.png"}
    assert all(p.stat().st_size > 0 for p in written)
    assert "interneg  mean" in report.table()
