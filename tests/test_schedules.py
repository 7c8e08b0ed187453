"""MSL weights (spec 1a) and cosine annealing of the outer learning rate (spec 1f)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mamlpp_fast import MetaLearner, preset
from mamlpp_fast.schedules import EpochCosineSchedule, cosine_annealed_learning_rate, per_step_loss_weights


@pytest.mark.parametrize(
    "num_steps, msl_epochs, epoch, expected",
    [
        (5, 10, 0, [0.2, 0.2, 0.2, 0.2, 0.2]),
        (5, 10, 1, [0.18, 0.18, 0.18, 0.18, 0.28]),
        (5, 10, 5, [0.1, 0.1, 0.1, 0.1, 0.6]),
        (5, 10, 10, [0.006, 0.006, 0.006, 0.006, 0.976]),
        (5, 10, 37, [0.006, 0.006, 0.006, 0.006, 0.976]),
        (5, 15, 5, [0.2 - 5 / 75] * 4 + [0.2 + 20 / 75]),
        (5, 15, 15, [0.006, 0.006, 0.006, 0.006, 0.976]),
        (1, 10, 3, [1.0]),
        (3, 4, 2, [1 / 3 - 2 / 12, 1 / 3 - 2 / 12, 1 / 3 + 4 / 12]),
    ],
)
def test_msl_weights_match_the_spec(num_steps, msl_epochs, epoch, expected):
    weights = per_step_loss_weights(num_steps, msl_epochs, epoch)
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_learner_msl_vector_follows_current_epoch_and_gate():
    learner = MetaLearner(preset("maml++_omniglot_5w1s"))
    assert learner.get_per_step_loss_importance_vector().dtype == torch.get_default_dtype()
    learner.current_epoch = 5
    np.testing.assert_allclose(learner.get_per_step_loss_importance_vector().numpy(), [0.1] * 4 + [0.6], atol=1e-7)
    config = learner.config
    assert config.uses_multi_step_loss(9, True) and not config.uses_multi_step_loss(10, True)


def test_cosine_schedule_is_piecewise_constant_per_epoch():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    schedule = EpochCosineSchedule(optimizer, total_epochs=100, min_lr=1e-5)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), T_max=100, eta_min=1e-5
    )
    for epoch in (0, 1, 37, 50, 99, 100):
        schedule.step(epoch)
        closed = reference._get_closed_form_lr()[0] if epoch == 0 else None
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / 100)) / 2
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert cosine_annealed_learning_rate(1e-3, 1e-5, epoch, 100) == pytest.approx(expected, rel=1e-12)
        if closed is not None:
            assert closed == pytest.approx(expected, rel=1e-12)
    state = schedule.state_dict()
    other = EpochCosineSchedule(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), 100, 1e-5)
    other.load_state_dict(state)
    assert other.get_last_lr() == schedule.get_last_lr()


def test_a_resumed_schedule_follows_the_new_config():
    """Resuming with more total_epochs (extending a run) anneals over the new length, as the
    official code's scheduler, rebuilt from the config and never saved, does; the checkpoint
    gives the position only."""
    short = EpochCosineSchedule(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), 2, 1e-5)
    short.step(1)
    extended_optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    extended = EpochCosineSchedule(extended_optimizer, total_epochs=6, min_lr=1e-5)
    extended.load_state_dict(short.state_dict())
    assert extended.last_epoch == 1
    for epoch in (1, 3, 5):
        extended.step(epoch)
        assert extended.get_last_lr()[0] == pytest.approx(cosine_annealed_learning_rate(1e-3, 1e-5, epoch, 6),
                                                          rel=1e-12)


def test_run_train_iter_uses_the_epochs_rate_before_the_step():
    config = preset("maml++_omniglot_5w1s", cnn_num_filters=4, number_of_training_steps_per_iter=1,
                    number_of_evaluation_steps_per_iter=1, total_epochs=10, batch_size=1)
    learner = MetaLearner(config)
    batch = (np.random.rand(1, 5, 1, 1, 28, 28).astype(np.float32), np.random.rand(1, 5, 1, 1, 28, 28).astype(np.float32),
             np.tile(np.arange(5).reshape(1, 5, 1), (1, 1, 1)), np.tile(np.arange(5).reshape(1, 5, 1), (1, 1, 1)))
    losses, _ = learner.run_train_iter(batch, epoch=3)
    assert losses["learning_rate"] == pytest.approx(cosine_annealed_learning_rate(1e-3, 1e-5, 3, 10), rel=1e-12)
    assert learner.current_epoch == 3
