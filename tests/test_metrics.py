"""OOD metrics against values worked out by hand (METHOD §7)."""
import numpy as np
import pytest

from pipeline.metrics import ood_metrics

ID = [0.9, 0.8, 0.7, 0.6, 0.2]
OOD = [0.65, 0.5, 0.4, 0.3]


def test_known_values_and_the_two_fpr95_conventions():
    m = ood_metrics(ID, OOD)
    assert m["auroc"] == pytest.approx(15 / 20)
    # ID positive: 95 % ID recall needs all 5 ID samples, threshold 0.2: all 4 OOD accepted
    assert m["fpr95_id_positive"] == pytest.approx(1.0)
    # OOD positive: flagging all 4 OOD needs threshold 0.65: ID 0.6 and 0.2 flagged
    assert m["fpr95_ood_positive"] == pytest.approx(2 / 5)
    assert m["aupr_in"] == pytest.approx((1 + 1 + 1 + 4 / 5 + 5 / 9) / 5)
    assert m["aupr_out"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4 + 4 / 6) / 4)


def test_id_positive_fpr95_is_read_at_the_nearest_point_as_mcm_and_neglabel_do():
    # 12 of 13 ID samples tie at 0.9; the 13th ties with two OOD samples at 0.3. Recall 12/13
    # (0.923) is nearer 95 % than 13/13: no OOD sample is accepted there. The first point
    # reaching 95 % (13/13) would accept 2 of 3.
    m = ood_metrics([0.9] * 12 + [0.3], [0.3, 0.3, 0.1])
    assert m["fpr95_id_positive"] == 0.0
    # of equally near points (the same recall), the one at the lowest threshold: 2 of 3 accepted
    assert ood_metrics([0.9] * 12 + [0.05], [0.5, 0.4, 0.01])["fpr95_id_positive"] == pytest.approx(2 / 3)


def test_perfect_separation():
    m = ood_metrics([0.9, 0.8], [0.1, 0.2])
    assert m == {"auroc": 1.0, "fpr95_ood_positive": 0.0, "fpr95_id_positive": 0.0, "aupr_in": 1.0, "aupr_out": 1.0}


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="ood_scores: 1 NaN"):
        ood_metrics([0.5], [np.nan, 0.1])
    with pytest.raises(ValueError, match="id_scores: no scores"):
        ood_metrics([], [0.1])


def test_the_threshold_for_a_false_alarm_rate_is_the_next_order_statistic():
    from pipeline.metrics import alarm_rate, threshold_for_rate

    scores = [0.9, 0.1, 0.5, 0.3, 0.7, 0.3, 0.8, 0.6, 0.2, 0.4]
    # 10 frames, 20 %: two may alarm, so the threshold is the third smallest; the two below it alarm
    assert threshold_for_rate(scores, 0.2) == 0.3 and alarm_rate(scores, 0.3) == 0.2
    # 25 %: floor(2.5) = 2, the same threshold; ties with it (the second 0.3) are not alarms
    assert threshold_for_rate(scores, 0.25) == 0.3
    assert threshold_for_rate(scores, 0.0) == 0.1 and alarm_rate(scores, 0.1) == 0.0
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        threshold_for_rate(scores, 1.0)


def test_a_calibrated_threshold_holds_its_rate_on_held_out_normal_frames():
    """On the simulated world's ID images: calibrate on half, measure on the other half."""
    from pipeline.metrics import alarm_rate, threshold_for_rate
    from pipeline.scoring import grouped_score
    from pipeline.simulate import SimulationParams, simulate_world

    world = simulate_world(SimulationParams(n_id_images=4000, n_lexicon_nouns=3000, n_lexicon_adjectives=500))
    negatives = world.lexicon_emb[np.argsort(world.lexicon_emb @ world.id_text.mean(axis=0))[:500]]
    scores = grouped_score(world.id_features, world.id_text, negatives, scale=100.0, groups=5)
    split = np.random.default_rng(1).permutation(len(scores))  # two random halves of one camera's normal frames
    calibration, held_out = scores[split[:2000]], scores[split[2000:]]
    for target in (0.01, 0.05, 0.2):
        threshold = threshold_for_rate(calibration, target)
        assert alarm_rate(calibration, threshold) <= target
        margin = 3 * np.sqrt(target * (1 - target) / 2000)  # three standard errors of a rate on 2,000 frames
        assert abs(alarm_rate(held_out, threshold) - target) <= margin, (target, alarm_rate(held_out, threshold))
