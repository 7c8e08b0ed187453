"""Memory-bounded meta-steps: task chunking with gradient accumulation, and per-inner-step
activation checkpointing, against the plain all-tasks-at-once meta-step in float64."""

from __future__ import annotations

import warnings

import pytest
import torch

from mamlpp_fast import MetaLearner, preset
from mamlpp_fast.testing import META_STEP_RTOL as RTOL
from mamlpp_fast.testing import assert_tensors_match
from mamlpp_fast.testing import is_inert as inert
from mamlpp_fast.testing import make_task_batch as make_batch

TINY = dict(cnn_num_filters=8, number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3)


def build(config, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MetaLearner(config, **options).double()


def one_step(learner, batch, epoch=0):
    """run_train_iter with the Adam step disabled: returns metrics, logits, meta-grads, stats."""
    grads = {}

    def capture():
        for name, param in learner.named_parameters():
            if param.grad is not None:
                grads[name] = param.grad.detach().clone()

    original = learner.optimizer.step
    learner.optimizer.step = lambda *a, **k: capture()
    try:
        losses, logits = learner.run_train_iter(batch, epoch)
    finally:
        learner.optimizer.step = original
    stats = {k: v.clone() for k, v in learner.state_dict().items() if "running" in k}
    return losses, logits, grads, stats


OPTIONS = [
    dict(task_chunk_size=1),
    dict(task_chunk_size=2),
    dict(task_chunk_size=3),          # uneven: chunks of 3, 2
    dict(checkpoint_inner_steps=True),
    dict(task_chunk_size=2, checkpoint_inner_steps=True),
]
# The official network options: with the uneven chunking and with both mechanisms together.
VARIANTS = [dict(max_pooling=False), dict(norm_layer="layer_norm"), dict(enable_inner_loop_optimizable_bn_params=True)]


@pytest.mark.parametrize("options, variant", [(options, {}) for options in OPTIONS]
                         + [(options, variant) for variant in VARIANTS for options in (OPTIONS[2], OPTIONS[4])])
@pytest.mark.parametrize("second_order, epoch", [(True, 0), (False, 0), (True, 20)])
def test_memory_bounded_meta_step_matches_plain(options, second_order, epoch, variant):
    torch.set_num_threads(1)
    config = preset("maml++_omniglot_5w1s", second_order=second_order, **TINY, **variant)
    batch = make_batch(config, 5)
    plain = build(config)
    bounded = build(config, **options)
    bounded.load_state_dict(plain.state_dict())
    ref_losses, ref_logits, ref_grads, ref_stats = one_step(plain, batch, epoch)
    losses, logits, grads, stats = one_step(bounded, batch, epoch)
    assert len(ref_grads) > 0 and grads.keys() == ref_grads.keys()
    assert_tensors_match(grads, ref_grads, "meta-gradient")
    assert_tensors_match({"logits": logits}, {"logits": ref_logits}, "target logits")
    assert_tensors_match({k: losses[k] for k in ("loss", "accuracy")},
                         {k: ref_losses[k] for k in ("loss", "accuracy")}, "metrics")
    assert losses.keys() == ref_losses.keys()
    assert_tensors_match(stats, ref_stats, "running statistics")


def test_chunked_training_then_adam_matches_plain_over_iterations():
    torch.set_num_threads(1)
    config = preset("maml++_omniglot_5w1s", **TINY)
    plain = build(config)
    chunked = build(config, task_chunk_size=2)
    chunked.load_state_dict(plain.state_dict())
    for iteration in range(2):
        batch = make_batch(config, 4, seed=iteration)
        a, _ = plain.run_train_iter(batch, 0)
        b, _ = chunked.run_train_iter(batch, 0)
        assert b["loss"].item() == pytest.approx(a["loss"].item(), rel=RTOL)
    expected, actual = plain.state_dict(), chunked.state_dict()
    for name, value in expected.items():
        if inert(name) or name.endswith("running_mean"):
            assert (actual[name] - value).abs().max().item() < 1e-8, name
        else:
            assert (actual[name] - value).norm().item() <= RTOL * value.norm().item(), name


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_bad_chunk_size_raises(bad):
    with pytest.raises(ValueError, match="task_chunk_size"):
        MetaLearner(preset("maml++_omniglot_5w1s", **TINY), task_chunk_size=bad)


def test_chunk_size_larger_than_batch_is_one_chunk():
    torch.set_num_threads(1)
    config = preset("maml++_omniglot_5w1s", **TINY)
    plain, chunked = build(config), build(config, task_chunk_size=64)
    chunked.load_state_dict(plain.state_dict())
    batch = make_batch(config, 2)
    assert_tensors_match(one_step(chunked, batch)[2], one_step(plain, batch)[2], "meta-gradient")
