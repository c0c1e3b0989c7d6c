"""The time left a training run prints: each phase's epochs timed apart, and kept in checkpoints."""

import io

import pytest

from train.progress import Clock, Plan

HEAD, BODY = "head", "body"


def plan() -> Plan:
    epochs = [(HEAD, 0, 224), (HEAD, 1, 224), (BODY, 0, 224), (BODY, 1, 224), (BODY, 2, 224), (BODY, 3, 352)]
    made = Plan(epochs, train_batches=10, valid_batches=3)
    made.estimate = {224: 300.0, 352: 900.0}
    return made


def test_the_time_left_after_the_head_epochs_counts_unfrozen_epochs_at_their_own_cost():
    p = plan()
    p.measured = {(HEAD, 224): [120.0, 120.0], (BODY, 224): [200.0]}
    # Two more unfrozen 224 px epochs at 200 s (not the head's 120 s), then the 352 px one's estimate.
    assert p.left_after(2) == pytest.approx(2 * 200 + 900)
    # Before any unfrozen epoch, they are estimated, not taken for head epochs.
    p.measured = {(HEAD, 224): [120.0]}
    assert p.left_after(0) == pytest.approx(120 + 3 * 300 + 900)
    assert p.unmeasured_sizes(1) == [224, 352] and p.unmeasured_sizes(5) == [352]
    assert "about 32 min for 5 epochs (4 at 224 px, 1 at 352 px; 224 px 5.0 min an epoch" in p.describe(1)


def test_an_epoch_slowed_by_other_work_moves_the_time_left_little():
    p = plan()
    p.measured = {(BODY, 224): [560.0, 200.0]}
    assert p.epoch_seconds(BODY, 224) == pytest.approx(380.0)
    p.measured[(BODY, 224)].append(200.0)
    assert p.epoch_seconds(BODY, 224) == pytest.approx(200.0)


def test_measured_times_go_into_checkpoints_and_come_back():
    p = plan()
    out = io.StringIO()
    clock = Clock(p, stream=out)
    clock.epoch_started()
    saved = clock.epoch_done(HEAD, 0, 0.25)
    assert list(saved) == ["head/224"] and len(saved["head/224"]) == 1
    assert out.getvalue().startswith("epoch 1 of 6 (head, 224 px): ") and "validation accuracy 0.2500" in out.getvalue()
    again = plan()
    again.restore(saved, BODY)
    assert again.measured == p.measured
    # A checkpoint written before phases were kept apart holds sizes alone: unfrozen epochs, the run's most.
    old = plan()
    old.restore({"224": [210.0, 190.0]}, BODY)
    assert old.measured == {(BODY, 224): [210.0, 190.0]}
