"""Temperature scaling, calibration error, ROC AUC and the acceptance threshold."""

import math

import pytest
import torch

from export import calibration as cal
from tests.support.paths import ROOT


def calibrated_fixture(n: int = 4000, classes: int = 10, seed: int = 0):
    """Logits and labels drawn so that softmax(logits) is the true chance of each label."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 2.0
    labels = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_temperature_undoes_known_over_confidence_and_lowers_ece():
    logits, labels = calibrated_fixture()
    confident = logits * 3.0  # the same ranking, stated three times too sharply
    before = cal.expected_calibration_error(torch.softmax(confident, dim=-1), labels)
    temperature = cal.fit_temperature(confident, labels)
    after = cal.expected_calibration_error(cal.calibrated_probabilities(confident, temperature), labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert before > 0.15
    assert after < 0.03 < before


def test_temperature_of_calibrated_logits_stays_near_one_and_of_timid_ones_goes_below():
    logits, labels = calibrated_fixture(seed=1)
    assert cal.fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)
    assert cal.fit_temperature(logits / 2.0, labels) == pytest.approx(0.5, rel=0.1)


def test_temperature_minimises_the_nll():
    logits, labels = calibrated_fixture(n=500, seed=2)
    logits = logits * 1.7
    best = cal.fit_temperature(logits, labels)

    def nll(t):
        return float(torch.nn.functional.cross_entropy(logits / t, labels))

    assert nll(best) <= min(nll(best * 0.95), nll(best * 1.05))


def test_temperature_of_logits_worse_than_chance_stops_at_the_cap_and_keeps_the_order():
    logits, _ = calibrated_fixture(n=200, seed=3)
    worst = logits.argmin(dim=1)  # every label is the class the logits rank last
    temperature = cal.fit_temperature(logits, worst)
    assert temperature == cal.MAX_TEMPERATURE
    capped = cal.calibrated_probabilities(logits.float(), temperature)
    assert torch.equal(capped.argmax(dim=1), logits.argmax(dim=1))
    # Uncapped, the fit heads for a temperature at which float32 ties every class.
    flattened = cal.calibrated_probabilities(logits.float(), 1e9)
    assert not torch.equal(flattened.argmax(dim=1), logits.argmax(dim=1))


def test_temperature_refuses_bad_input():
    with pytest.raises(ValueError):
        cal.fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError):
        cal.fit_temperature(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        cal.fit_temperature(torch.zeros(2, 2), torch.tensor([0, 2]))


def test_ece_by_hand():
    # Bin 14 (0.9333, 1]: confidences 0.95 and 1.0, one right: |0.5 - 0.975| = 0.475, weight 2/4.
    # Bin 8 (0.5333, 0.6]: confidence 0.6, right: |1 - 0.6| = 0.4, weight 1/4.
    # Bin 7 (0.4667, 0.5333]: confidence 0.5 (first of a tie wins), wrong: 0.5, weight 1/4.
    probabilities = torch.tensor([[0.95, 0.05], [0.0, 1.0], [0.6, 0.4], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 0, 1])
    expected = 0.5 * 0.475 + 0.25 * 0.4 + 0.25 * 0.5
    assert cal.expected_calibration_error(probabilities, labels) == pytest.approx(expected)


def test_ece_is_zero_when_confidence_matches_accuracy_in_every_bin():
    probabilities = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])  # 3 of 4 right at 0.75 confidence
    assert cal.expected_calibration_error(probabilities, labels) == pytest.approx(0.0)
    # One bin holding everything sees only the average.
    assert cal.expected_calibration_error(torch.tensor([[0.9, 0.1], [0.3, 0.7]]), torch.tensor([0, 0]), bins=1) \
        == pytest.approx(abs(0.5 - 0.8))


def test_probabilities_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert cal.calibrated_probabilities(logits)[:, 0].tolist() == pytest.approx([1 / (1 + math.exp(-2)), 0.5])
    assert cal.calibrated_probabilities(logits, 2.0)[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1)))


@pytest.mark.parametrize("known, unknown, expected", [
    ([3.0, 4.0], [1.0, 2.0], 1.0),            # perfectly separated
    ([1.0, 2.0], [3.0, 4.0], 0.0),            # perfectly reversed
    ([1.0, 3.0], [2.0], 0.5),                 # one pair won, one lost
    ([2.0, 2.0], [2.0, 2.0], 0.5),            # all tied: each pair counts half
    # 1 beats 0 (1); 2 beats 0 and ties 2 (1.5); 4 beats all three (3): 5.5 of 9 pairs.
    ([1.0, 2.0, 4.0], [0.0, 2.0, 3.0], 5.5 / 9),
])
def test_roc_auc_by_hand(known, unknown, expected):
    assert cal.roc_auc(torch.tensor(known), torch.tensor(unknown)) == pytest.approx(expected)


def test_roc_auc_matches_counting_every_pair():
    generator = torch.Generator().manual_seed(3)
    known = torch.randint(0, 20, (37,), generator=generator).float()  # integers: plenty of ties
    unknown = torch.randint(0, 15, (23,), generator=generator).float()
    pairs = (known[:, None] > unknown[None, :]).double() + 0.5 * (known[:, None] == unknown[None, :]).double()
    assert cal.roc_auc(known, unknown) == pytest.approx(float(pairs.mean()))


def test_roc_auc_needs_both_sides():
    with pytest.raises(ValueError):
        cal.roc_auc(torch.tensor([1.0]), torch.tensor([]))
    with pytest.raises(ValueError):
        cal.roc_auc(torch.tensor([float("nan")]), torch.tensor([1.0]))


def test_threshold_keeps_the_asked_share_and_no_more_than_needed():
    scores = torch.arange(1.0, 11.0)  # 1..10
    threshold = cal.choose_threshold(scores, 0.9)
    assert threshold == 2.0
    assert cal.acceptance(scores, threshold).sum() == 9
    # Any higher threshold would keep fewer than 90 %.
    assert cal.acceptance(scores, 2.0 + 1e-6).float().mean() < 0.9


@pytest.mark.parametrize("keep, expected", [(1.0, 1.0), (0.95, 1.0), (0.91, 1.0), (0.5, 6.0), (0.1, 10.0),
                                            (0.01, 10.0)])
def test_threshold_edges(keep, expected):
    scores = torch.arange(10.0, 0.0, -1.0)  # order does not matter
    assert cal.choose_threshold(scores, keep) == expected


def test_threshold_with_ties_keeps_them_all():
    scores = torch.tensor([0.2, 0.5, 0.5, 0.5, 0.9])
    threshold = cal.choose_threshold(scores, 0.6)  # 3 of 5 wanted; the tie brings 4
    assert threshold == 0.5
    assert cal.acceptance(scores, threshold).tolist() == [False, True, True, True, True]


def test_threshold_of_a_single_photo_and_bad_input():
    assert cal.choose_threshold(torch.tensor([0.7]), 0.9) == pytest.approx(0.7)
    for keep in (0.0, -0.1, 1.1):
        with pytest.raises(ValueError):
            cal.choose_threshold(torch.tensor([0.5, 0.6]), keep)
    with pytest.raises(ValueError):
        cal.choose_threshold(torch.tensor([]), 0.9)
    with pytest.raises(ValueError):
        cal.choose_threshold(torch.tensor([0.5, float("nan")]), 0.9)


def test_module_does_not_import_fastai():
    import subprocess
    import sys

    code = "import sys, export.calibration; sys.exit(1 if any(m.startswith('fastai') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_familiarity_is_the_cosine_to_the_nearest_class_mean():
    features = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    directions = cal.class_directions(features, labels, 2)
    assert torch.allclose(directions, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    probe = torch.tensor([[1.0, 1.0], [5.0, 0.1], [-1.0, -1.0]])
    expected = torch.tensor([2 ** -0.5, 5.0 / (25.01 ** 0.5), -(2 ** -0.5)])
    assert torch.allclose(cal.familiarity(probe, directions), expected, atol=1e-6)
    # Scale does not matter, direction does.
    assert torch.allclose(cal.familiarity(probe * 7.0, directions), expected, atol=1e-6)


def test_familiarity_traces_into_a_module():
    directions = cal.class_directions(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), 3)

    class Score(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("directions", directions)

        def forward(self, x):
            return cal.familiarity(x, self.directions)

    traced = torch.jit.trace(Score().eval(), torch.randn(2, 4))
    batch = torch.randn(5, 4)
    assert torch.allclose(traced(batch), cal.familiarity(batch, directions))


def test_class_directions_refuse_an_empty_class():
    with pytest.raises(ValueError):
        cal.class_directions(torch.randn(3, 2), torch.tensor([0, 0, 2]), 3)


def test_written_threshold_rounds_down_to_six_decimals():
    assert cal.written_threshold(0.1234567) == 0.123456
    assert cal.written_threshold(0.1234564) == 0.123456
    assert cal.written_threshold(0.5) == 0.5
    assert cal.written_threshold(-0.1234561) == -0.123457
    generator = torch.Generator().manual_seed(4)
    for value in torch.rand(1000, generator=generator, dtype=torch.float64).tolist():
        written = cal.written_threshold(value)
        assert written <= value < written + 1.0001e-6 and written == round(written, 6)


def test_acceptance_compares_a_float32_score_as_the_server_does():
    score = torch.tensor([0.7], dtype=torch.float32)
    above = float(score[0]) + 1e-12  # rounds to the score itself in float32
    assert float(score[0]) < above
    assert not cal.acceptance(score, above).item()
    assert cal.acceptance(score, float(score[0])).item()


def test_precision_threshold_is_the_lowest_that_stays_right_often_enough():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = torch.tensor([True, True, False, True, False, False])
    # From the top: 1/1, 2/2, 2/3, 3/4, 3/5, 3/6 right.
    assert cal.choose_precision_threshold(scores, correct, 0.75) == pytest.approx(0.6)
    assert cal.choose_precision_threshold(scores, correct, 0.9) == pytest.approx(0.8)
    assert cal.choose_precision_threshold(scores, correct, 0.5) == pytest.approx(0.4)
    assert cal.choose_precision_threshold(scores, torch.zeros(6, dtype=torch.bool), 0.5) is None
    assert cal.choose_precision_threshold(torch.tensor([]), torch.tensor([], dtype=torch.bool), 0.9) is None
    # Tied scores are in or out together: 0.7 would answer both 0.7s, one of them wrong (3/4).
    tied = torch.tensor([0.9, 0.7, 0.7])
    assert cal.choose_precision_threshold(tied, torch.tensor([True, True, False]), 0.8) == pytest.approx(0.9)


def test_top_k_accuracy_and_confused_pairs():
    probabilities = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 1, 0, 1])
    assert cal.top_k_accuracy(probabilities, labels, 1) == pytest.approx(0.25)
    assert cal.top_k_accuracy(probabilities, labels, 2) == pytest.approx(0.75)
    pairs = cal.confused_pairs(probabilities.argmax(dim=1), labels, ["a", "b", "c"])
    assert pairs == [{"a": "a", "b": "b", "count": 2}, {"a": "a", "b": "c", "count": 1}]


def test_confused_pairs_count_both_directions_and_keep_the_most():
    names = ["a", "b", "c", "d"]
    # b taken for a twice and a for b once: 3; c and d confused once each way: 2; a for c once.
    predicted = torch.tensor([0, 0, 1, 3, 2, 0, 2])
    labels = torch.tensor([1, 1, 0, 2, 3, 2, 2])
    assert cal.confused_pairs(predicted, labels, names) == [
        {"a": "a", "b": "b", "count": 3}, {"a": "c", "b": "d", "count": 2}, {"a": "a", "b": "c", "count": 1}]
    assert cal.confused_pairs(predicted, labels, names, most=1) == [{"a": "a", "b": "b", "count": 3}]
    assert cal.confused_pairs(labels, labels, names) == []


def test_class_bootstrap_by_hand():
    # Class 0: one photo, right; class 1: one photo, wrong. A draw of two classes gives 1, 1/2 or 0.
    interval = cal.class_bootstrap(torch.tensor([True, False]), torch.tensor([0, 1]), draws=2000)
    assert (interval.low, interval.high) == (0.0, 1.0)
    assert interval.groups == 2 and interval.draws == 2000 and interval.level == 0.95


def test_class_bootstrap_counts_every_photo_of_a_drawn_class():
    # Nine photos of a class all right, one of another wrong: the mixed draws give 9/10, not 1/2.
    hits = torch.tensor([True] * 9 + [False])
    groups = torch.tensor([7] * 9 + [3])
    interval = cal.class_bootstrap(hits, groups, draws=4000, level=0.2)  # the middle draws: mixed pairs
    assert interval.low == pytest.approx(0.9) and interval.high == pytest.approx(0.9)


def test_class_bootstrap_collapses_when_every_class_scores_alike_and_is_deterministic():
    hits = torch.tensor([True, False] * 8)
    groups = torch.arange(16) // 2  # eight classes, each half right
    interval = cal.class_bootstrap(hits, groups)
    assert interval.low == pytest.approx(0.5) and interval.high == pytest.approx(0.5)
    spread = torch.tensor([True] * 6 + [False] * 10)
    first = cal.class_bootstrap(spread, groups, seed=3)
    assert first == cal.class_bootstrap(spread, groups, seed=3)
    assert first.low < 6 / 16 < first.high
    assert first.as_dict()["classes"] == 8


def test_class_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError):
        cal.class_bootstrap(torch.tensor([True]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        cal.class_bootstrap(torch.tensor([], dtype=torch.bool), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError):
        cal.class_bootstrap(torch.tensor([True]), torch.tensor([0]), level=1.0)
