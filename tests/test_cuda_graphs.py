"""CUDA-graph replay of the meta-step (`MetaLearner(cuda_graphs=True)`): on CUDA, replayed
meta-steps end with the same parameters, optimizer state, running statistics and metrics as
eager ones (float64, across MSL and derivative-order switches and a batch-shape change); off
CUDA, the option warns once and runs eagerly."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from mamlpp_fast import MetaLearner, preset
from mamlpp_fast.cuda_graphs import MetaStepGraphs
from mamlpp_fast.testing import assert_states_match_after_adam, assert_tensors_match, make_task_batch

# Small network; second order from epoch 2 on (DA), MSL on for epochs 0-2, so the epochs below
# cross both switches and the graph keys change twice.
SMALL = dict(cnn_num_filters=8, number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3,
             first_order_to_second_order_epoch=1, multi_step_loss_num_epochs=3)
EPOCHS = (0, 0, 1, 2, 2, 3, 3)


def build(config, device, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MetaLearner(config, device=device, **options).double()


def eager_and_graphed(config, device, **options):
    """Two learners with the same state, the second with cuda_graphs=True."""
    eager = build(config, device, **options)
    graphed = build(config, device, cuda_graphs=True, **options)
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def train(learner, batches, epochs):
    metrics = []
    for batch, epoch in zip(batches, epochs):
        losses, logits = learner.run_train_iter(batch, epoch)
        metrics.append({"loss": losses["loss"], "accuracy": losses["accuracy"], "logits": logits,
                        "msl": torch.stack([losses[f"loss_importance_vector_{i}"] for i in range(3)])})
    return metrics


def adam_state(learner):
    """Adam's moments by parameter name (so inert tensors are recognised by name)."""
    out = {}
    for name, param in learner.named_parameters():
        for key, value in learner.optimizer.state.get(param, {}).items():
            out[f"{name}.{key}"] = torch.as_tensor(value, dtype=torch.float64)
    return out


def check_same_run(graphed, eager, graphed_metrics, eager_metrics):
    for step, (g, e) in enumerate(zip(graphed_metrics, eager_metrics)):
        assert_tensors_match(g, e, f"meta-step {step} metrics")
    # After Adam, the conv biases (exact gradient zero) hold Adam-normalised rounding noise, which
    # any last-bit difference upstream changes: cuDNN's float64 weight-gradient kernels need not
    # round alike from run to run, and the recorded Adam step rounds its last multiply-add apart
    # from the eager kernel. The biases and the running means (which include them) are compared
    # to an absolute 1e-8, their Adam moments at the scale of all moments (inert_floor=1), the
    # rest at 1e-10.
    assert_states_match_after_adam(graphed.state_dict(), eager.state_dict(), "parameters and running stats")
    assert_tensors_match(adam_state(graphed), adam_state(eager), "Adam state", inert_floor=1.0)


def graphed_run_warning_once(config, device, match, num_batches=3, prepare=None):
    """Train an eager and a graphed learner (same state, same batches; `prepare` applied to
    both first). The graphed run must warn exactly once, matching `match`, and end where the
    eager one does. Returns the graphed learner."""
    batches = [make_task_batch(config, 2, seed=s) for s in range(num_batches)]
    eager, graphed = eager_and_graphed(config, device)
    for learner in (eager, graphed):
        if prepare is not None:
            prepare(learner)
    eager_metrics = train(eager, batches, EPOCHS[:num_batches])
    with pytest.warns(UserWarning, match=match) as record:
        graphed_metrics = train(graphed, batches, EPOCHS[:num_batches])
    assert sum(re.search(match, str(w.message)) is not None for w in record) == 1
    check_same_run(graphed, eager, graphed_metrics, eager_metrics)
    return graphed


def test_cuda_graphs_off_cuda_warn_once_and_run_eagerly():
    graphed = graphed_run_warning_once(preset("maml++_omniglot_5w1s", **SMALL), "cpu", "CUDA graphs need a CUDA device")
    assert graphed.graphs.captures == 0 and graphed.graphs.replays == 0


@pytest.mark.parametrize("options, reason", [
    (dict(), None),
    (dict(task_chunk_size=1), "task_chunk_size"),
    (dict(checkpoint_inner_steps=True), "checkpoint_inner_steps"),
])
def test_cuda_graphs_name_what_they_cannot_combine_with(options, reason):
    learner = build(preset("maml++_omniglot_5w1s", **SMALL), "cpu", cuda_graphs=True, **options)
    assert "CUDA device" in learner.graphs.unsupported_reason()
    on_cuda = MetaStepGraphs(_OnCuda(learner))
    if reason is None:
        assert on_cuda.unsupported_reason() is None
    else:
        assert reason in on_cuda.unsupported_reason()


class _OnCuda:
    """Forwards to a learner but reports a CUDA device (eligibility checks only)."""

    def __init__(self, learner):
        self._learner = learner

    def __getattr__(self, name):
        return getattr(self._learner, name)

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize("epoch", [0, 30])  # first order with MSL; second order without
def test_warm_up_before_capture_changes_no_learner_state(epoch):
    """The eager passes before a capture fold running statistics and fill .grad; all of it
    (running statistics included: they are requires_grad=False parameters) must be put back."""
    learner = build(preset("maml++_omniglot_5w1s", **SMALL), "cpu", cuda_graphs=True)
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        learner.run_train_iter(make_task_batch(learner.config, 2, seed=1), epoch)  # non-trivial state
    learner.classifier.layer_dict["conv0"].conv.weight.grad = torch.ones_like(
        learner.classifier.layer_dict["conv0"].conv.weight)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in learner.named_parameters()}
    batch = learner.prepare_batch(make_task_batch(learner.config, 2, seed=2))
    learner.graphs._warm_up(batch, epoch)
    for name, value in learner.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, param in learner.named_parameters():
        expected = grads_before[name]
        assert (param.grad is None) == (expected is None) and (expected is None or torch.equal(param.grad, expected)), name


def test_graph_adam_follows_the_learners_optimizer():
    learner = build(preset("maml++_omniglot_5w1s", **SMALL), "cpu", cuda_graphs=True)
    adam = learner.graphs.graph_adam()
    assert adam is not None and adam.optimizer is learner.optimizer
    assert learner.graphs.graph_adam() is adam  # one per optimizer: recordings hold its scalars
    learner.optimizer = torch.optim.Adam(learner.trainable_parameters(), amsgrad=True)
    with pytest.warns(UserWarning, match="optimizer step cannot be recorded .*amsgrad.* runs eagerly after each replay"):
        assert learner.graphs.graph_adam() is None
    learner.optimizer = torch.optim.Adam(learner.trainable_parameters())
    assert learner.graphs.graph_adam().optimizer is learner.optimizer
    learner.graphs.optimizer_in_graph = False
    assert learner.graphs.graph_adam() is None


def test_graph_key_changes_when_the_optimizer_state_is_replaced():
    """A recorded Adam step writes the optimizer state's storage: a checkpoint loaded into the
    optimizer (new storage) must lead to a new recording, an in-place step must not."""
    learner = build(preset("maml++_omniglot_5w1s", **SMALL), "cpu")
    batch = learner.prepare_batch(make_task_batch(learner.config, 2))
    graphs = MetaStepGraphs(learner)
    adam = graphs.graph_adam()
    adam.initialise_state()
    key = graphs._key(batch, 0, adam)
    learner.run_train_iter(batch, 0)  # eager Adam step: in place
    assert graphs._key(batch, 0, adam) == key
    learner.optimizer.load_state_dict(copy.deepcopy(learner.optimizer.state_dict()))
    assert graphs._key(batch, 0, adam) != key
    assert graphs._key(batch, 0, None) != graphs._key(batch, 0, adam)


def test_graph_key_follows_which_parameters_are_trained():
    learner = build(preset("maml++_omniglot_5w1s", **SMALL), "cpu")
    batch = learner.prepare_batch(make_task_batch(learner.config, 2))
    graphs = MetaStepGraphs(learner)
    key = graphs._key(batch, 0, None)
    learner.classifier.layer_dict["linear"].weights.requires_grad_(False)  # frozen after a capture
    assert graphs._key(batch, 0, None) != key


def test_learner_with_cuda_graphs_deep_copies():
    learner = build(preset("maml++_omniglot_5w1s", **SMALL), "cpu", cuda_graphs=True)
    clone = copy.deepcopy(learner)
    assert clone.graphs.learner is clone and learner.graphs.learner is learner


@pytest.mark.cuda
@pytest.mark.parametrize("setting, conv_strategy, variant", [
    ("maml++_omniglot_5w1s", "auto", {}),
    ("maml++_mini-imagenet_5w1s", "auto", {}),
    ("maml++_omniglot_5w1s", ("triton", "auto", "auto", "auto"), {}),  # Triton kernels inside the graph
    # Official options no released config uses: ATen stages, per-task BN parameters in the graph.
    ("maml++_omniglot_5w1s", "auto", dict(max_pooling=False, norm_layer="layer_norm")),
    ("maml++_omniglot_5w1s", "auto", dict(enable_inner_loop_optimizable_bn_params=True)),
])
def test_cuda_graph_replay_matches_eager_float64(setting, conv_strategy, variant):
    config = preset(setting, **SMALL, **variant)
    shapes = [2] * 5 + [3] * 2  # the last two meta-steps have another batch shape: a new capture
    batches = [make_task_batch(config, b, seed=s) for s, b in enumerate(shapes)]
    eager, graphed = eager_and_graphed(config, "cuda", conv_strategy=conv_strategy)
    eager_metrics = train(eager, batches, EPOCHS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed_metrics = train(graphed, batches, EPOCHS)
    fallbacks = [str(w.message) for w in caught if "eagerly" in str(w.message)]
    assert not fallbacks, fallbacks  # a silent fallback to eager would hide a capture failure
    # Keys: (B=2, first order, MSL), (B=2, second order, MSL), (B=3, second order, no MSL).
    assert graphed.graphs.captures == 3
    assert graphed.graphs.replays == graphed.graphs.optimizer_replays == len(EPOCHS)  # Adam recorded too
    check_same_run(graphed, eager, graphed_metrics, eager_metrics)


@pytest.mark.cuda
def test_cuda_graph_run_resumes_from_a_checkpoint(tmp_path):
    """save_model / load_model in the middle of a graphed run: the loaded optimizer state is new
    storage (a new recording), its step counters are back on the host, and the run continues
    exactly as an eager one."""
    config = preset("maml++_omniglot_5w1s", **SMALL)
    batches = [make_task_batch(config, 2, seed=s) for s in range(5)]
    eager, graphed = eager_and_graphed(config, "cuda")
    eager_metrics = train(eager, batches, EPOCHS[:5])
    train(graphed, batches[:3], EPOCHS[:3])
    graphed.save_model(tmp_path / "train_model_3", {})
    resumed = build(config, "cuda", cuda_graphs=True)
    resumed.load_model(tmp_path, "train_model", 3)
    assert all(state["step"].device.type == "cpu" for state in resumed.optimizer.state.values())
    resumed_metrics = train(resumed, batches[3:], EPOCHS[3:5])
    assert resumed.graphs.optimizer_replays == 2
    check_same_run(resumed, eager, resumed_metrics, eager_metrics[3:])


@pytest.mark.cuda
def test_cuda_graph_records_without_adam_when_adam_cannot_be_recorded(monkeypatch):
    """A failure while recording the optimizer step keeps the rest of the graph: the meta-step
    is recorded without Adam, which steps after each replay (one warning)."""
    from mamlpp_fast import graph_adam

    def broken_update(self, params, grads):
        raise RuntimeError("simulated recording failure")

    monkeypatch.setattr(graph_adam.GraphAdam, "update", broken_update)
    graphed = graphed_run_warning_once(preset("maml++_omniglot_5w1s", **SMALL), "cuda",
                                       "recording the optimizer step failed .*simulated")
    assert graphed.graphs.replays == 3 and graphed.graphs.optimizer_replays == 0


@pytest.mark.cuda
def test_cuda_graph_steps_an_unrecordable_optimizer_eagerly():
    """An optimizer GraphAdam refuses (here amsgrad) steps after each replay, with one warning."""
    config = preset("maml++_mini-imagenet_5w1s", **SMALL)  # imagenet: the eager clamp runs too

    def use_amsgrad(learner):
        learner.optimizer = torch.optim.Adam(learner.trainable_parameters(), lr=config.meta_learning_rate, amsgrad=True)
        learner.scheduler.optimizer = learner.optimizer

    graphed = graphed_run_warning_once(config, "cuda", "optimizer step cannot be recorded .*amsgrad",
                                       num_batches=4, prepare=use_amsgrad)
    assert graphed.graphs.replays == 4 and graphed.graphs.optimizer_replays == 0


@pytest.mark.cuda
def test_cuda_graph_recaptures_after_the_learner_moves():
    config = preset("maml++_omniglot_5w1s", **SMALL)
    learner = build(config, "cuda", cuda_graphs=True)
    batch = make_task_batch(config, 2)
    learner.run_train_iter(batch, 0)
    learner.float().double()  # new storage for every parameter: the old recording is stale
    learner.run_train_iter(batch, 0)
    assert learner.graphs.captures == 2
