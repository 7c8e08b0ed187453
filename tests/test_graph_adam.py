"""`GraphAdam` (the Adam step recorded inside MetaLearner's CUDA graph) against
`torch.optim.Adam.step`: same parameters, same optimizer state and state_dict, through learning
rate changes, parameters without gradients, a resumed optimizer and the MAML++ meta-step itself.
Its pieces run eagerly here; the GPU tests replay them from a graph (tests/test_cuda_graphs.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mamlpp_fast import MetaLearner, preset
from mamlpp_fast.graph_adam import GraphAdam
from mamlpp_fast.testing import assert_states_match_after_adam, assert_tensors_match, make_task_batch

SHAPES = [(), (5,), (3, 1, 3, 3), (2, 7), (4, 4, 3, 3)]


def make_params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in SHAPES]


def make_optimizer(params, **options):
    """Two groups with different hyperparameters, as a user's optimizer might have."""
    return torch.optim.Adam([
        {"params": params[:2], "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-6},
        {"params": params[2:]},
    ], lr=0.001, **options)


def random_grads(params, seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


def graph_step(adam, params, grads):
    adam.stage(params)
    adam.update(params, grads)
    adam.commit(params)


def eager_step(optimizer, params, grads):
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    optimizer.step()
    for param in params:
        param.grad = None


def assert_same_optimizer(actual, expected, exact=True):
    """Same param groups and state layout (keys, dtypes, devices: the checkpoint format);
    with `exact`, the same state values too."""
    a, e = actual.state_dict(), expected.state_dict()
    assert a["param_groups"] == e["param_groups"]
    assert a["state"].keys() == e["state"].keys()
    for index, state in e["state"].items():
        assert a["state"][index].keys() == state.keys(), index
        for key, value in state.items():
            got = a["state"][index][key]
            assert got.dtype == value.dtype and got.device == value.device, (index, key)
            if exact or key == "step":
                assert torch.equal(got, value), (index, key)


def adam_moments(learner):
    """Adam's moments by parameter name (so inert tensors are recognised by name)."""
    return {f"{name}.{key}": value for name, param in learner.named_parameters()
            for key, value in learner.optimizer.state.get(param, {}).items() if key != "step"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("foreach", [False, True])
def test_graph_adam_steps_like_torch_adam(dtype, foreach):
    eager_params = make_params(dtype)
    graph_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    eager = make_optimizer(eager_params, foreach=foreach)
    staged = make_optimizer(graph_params, foreach=foreach)
    adam = GraphAdam(staged)
    adam.initialise_state()  # before the first step, as the graph does
    for step in range(7):
        if step in (2, 5):  # the cosine schedule changes the learning rate between steps
            for optimizer in (eager, staged):
                optimizer.param_groups[1]["lr"] *= 0.5
        grads = random_grads(eager_params, step)
        eager_step(eager, eager_params, grads)
        graph_step(adam, graph_params, grads)
    # The parameter step is the same arithmetic, up to a fused multiply-add in the eager kernel.
    rtol = 1e-14 if dtype == torch.float64 else 1e-6
    for got, want in zip(graph_params, eager_params):
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert_same_optimizer(staged, eager)
    assert not any(p.grad is not None for p in graph_params)  # GraphAdam does not touch .grad


def test_graph_adam_steps_only_the_parameters_given():
    """Eager Adam skips parameters without a gradient (their state stays empty, their step
    count still); GraphAdam steps exactly the parameters it is given."""
    eager_params = make_params(torch.float64)
    graph_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    eager, staged = make_optimizer(eager_params), make_optimizer(graph_params)
    adam = GraphAdam(staged)
    with_grad = [0, 2, 3]  # parameters 1 and 4 never get a gradient
    for step in range(3):
        grads = random_grads(eager_params, step)
        eager_step(eager, [eager_params[i] for i in with_grad], [grads[i] for i in with_grad])
        adam.initialise_state()
        graph_step(adam, [graph_params[i] for i in with_grad], [grads[i] for i in with_grad])
    for got, want in zip(graph_params, eager_params):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    for index in with_grad:
        assert float(staged.state[graph_params[index]]["step"]) == 3.0
    for index in (1, 4):  # initialised like a first step would, never stepped
        state = staged.state[graph_params[index]]
        assert float(state["step"]) == 0.0 and not state["exp_avg"].any()
        assert torch.equal(graph_params[index], eager_params[index])


def test_graph_adam_continues_a_resumed_optimizer():
    eager_params = make_params(torch.float64)
    eager = make_optimizer(eager_params)
    for step in range(3):
        eager_step(eager, eager_params, random_grads(eager_params, step))
    graph_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    staged = make_optimizer(graph_params)
    staged.load_state_dict(copy.deepcopy(eager.state_dict()))  # a checkpoint from an eager run
    adam = GraphAdam(staged)
    before = adam.state_addresses()
    adam.initialise_state()
    assert adam.state_addresses() == before  # loaded state is used, not replaced
    for step in range(3, 6):
        grads = random_grads(eager_params, step)
        eager_step(eager, eager_params, grads)
        graph_step(adam, graph_params, grads)
        assert adam.state_addresses() == before  # stepping writes in place
    for got, want in zip(graph_params, eager_params):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert_same_optimizer(staged, eager)
    staged.load_state_dict(copy.deepcopy(eager.state_dict()))
    assert adam.state_addresses() != before  # new storage: a recording of update() is stale


@pytest.mark.parametrize("options, fragment", [
    (dict(amsgrad=True), "amsgrad=True"),
    (dict(weight_decay=0.1), "weight_decay=0.1"),
    (dict(maximize=True), "maximize=True"),
    (dict(lr=torch.tensor(0.001)), "tensor lr"),
])
def test_graph_adam_refuses_what_it_cannot_record(options, fragment):
    params = make_params(torch.float64)
    optimizer = torch.optim.Adam(params, **options)
    assert fragment in GraphAdam.unsupported_reason(optimizer)
    with pytest.raises(ValueError, match=f"optimizer: .*{fragment}"):
        GraphAdam(optimizer)


class _Recording(TorchDispatchMode):
    """Records the ATen calls made under it with the very tensors they were given, like a CUDA
    graph records kernels with their pointers and scalar arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, args, kwargs or {}, out))
        return out

    def replay(self):
        """Run the calls again; functional ones write into their recorded outputs (the graph's
        static memory), so later calls read them there."""
        for func, args, kwargs, out in self.calls:
            new = func(*args, **kwargs)
            if out is not None and not func._schema.is_mutable:
                outs, news = (out, new) if isinstance(out, (list, tuple)) else ([out], [new])
                for static, value in zip(outs, news):
                    static.copy_(value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_graph_adam_update_replayed_like_a_graph(dtype):
    """`update` recorded once and replayed, as in the meta-step's CUDA graph: everything that
    changes between steps (the learning rate, the bias corrections, the gradients) must reach
    the replay through tensors, not through values fixed at recording."""
    eager_params = make_params(dtype)
    graph_params = [torch.nn.Parameter(p.detach().clone()) for p in eager_params]
    eager, staged = make_optimizer(eager_params), make_optimizer(graph_params)
    adam = GraphAdam(staged)
    adam.initialise_state()
    static_grads = [torch.zeros_like(p) for p in graph_params]
    adam.stage(graph_params)
    recording = _Recording()
    with torch.no_grad(), recording:
        adam.update(graph_params, static_grads)
    # A capture runs nothing: put back what recording here did (zero gradients moved nothing but
    # the state is compared exactly below).
    with torch.no_grad():
        for param, original in zip(graph_params, eager_params):
            param.copy_(original)
    assert recording.calls
    for step in range(9):
        if step in (3, 6):
            for optimizer in (eager, staged):
                optimizer.param_groups[0]["lr"] *= 0.5
                optimizer.param_groups[1]["lr"] *= 0.3
        grads = random_grads(eager_params, step)
        eager_step(eager, eager_params, grads)
        for static, grad in zip(static_grads, grads):
            static.copy_(grad)
        adam.stage(graph_params)
        with torch.no_grad():
            recording.replay()
        adam.commit(graph_params)
    rtol = 1e-14 if dtype == torch.float64 else 1e-6
    for got, want in zip(graph_params, eager_params):
        torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert_same_optimizer(staged, eager)


def test_graph_adam_refuses_other_optimizers_hooks_and_mixed_dtypes():
    params = make_params(torch.float64)
    assert "SGD" in GraphAdam.unsupported_reason(torch.optim.SGD(params, lr=0.1))
    hooked = torch.optim.Adam(params)
    handle = hooked.register_step_post_hook(lambda *args: None)
    assert "step hooks" in GraphAdam.unsupported_reason(hooked)
    handle.remove()
    assert GraphAdam.unsupported_reason(hooked) is None
    mixed = torch.optim.Adam(params[:2] + make_params(torch.float32)[2:])
    assert "mixes dtypes" in GraphAdam.unsupported_reason(mixed)
    # Eager Adam steps these in float32 arithmetic (or views complex as real); `update` would not.
    for dtype in (torch.bfloat16, torch.float16, torch.complex64):
        reason = GraphAdam.unsupported_reason(torch.optim.Adam([torch.nn.Parameter(torch.zeros(3, dtype=dtype))]))
        assert str(dtype) in reason and "float32 or float64" in reason


def test_graph_adam_scalars_follow_the_parameters_dtype():
    params = make_params(torch.float64)
    adam = GraphAdam(torch.optim.Adam(params))
    adam.initialise_state()
    adam.stage(params)
    assert adam._scalars[0][0].dtype == torch.float64
    for param in params:  # what learner.float() does to parameters in place
        param.data = param.data.float()
        adam.optimizer.state[param]["exp_avg"] = adam.optimizer.state[param]["exp_avg"].float()
        adam.optimizer.state[param]["exp_avg_sq"] = adam.optimizer.state[param]["exp_avg_sq"].float()
    adam.stage(params)
    assert adam._scalars[0][0].dtype == adam._scalars[0][1].dtype == torch.float32
    grads = random_grads(params, 0)
    adam.update(params, grads)  # same dtype throughout: no promotion to float64 in the update
    assert all(param.dtype == torch.float32 for param in params)


def test_graph_adam_says_what_is_out_of_order():
    params = make_params(torch.float64)
    adam = GraphAdam(torch.optim.Adam(params))
    with pytest.raises(RuntimeError, match="needs stage"):
        adam.update(params, random_grads(params, 0))
    with pytest.raises(ValueError, match="params: some tensors are not parameters"):
        adam.stage([torch.nn.Parameter(torch.zeros(2))])
    adam.initialise_state()
    adam.optimizer.state[params[0]]["step"] += 1  # not a state Adam itself would produce
    with pytest.raises(RuntimeError, match="step counts differ"):
        adam.stage(params)
    with pytest.raises(ValueError, match="must pair up"):
        adam.update(params, random_grads(params, 0)[:2])


@pytest.mark.parametrize("setting", ["maml++_omniglot_5w1s", "maml++_mini-imagenet_5w1s"])
def test_recorded_meta_step_order_matches_eager_meta_step(setting):
    """What MetaStepGraphs records, run eagerly: forward, outer backward, gradient clamp
    (mini-ImageNet clamps to +-10), GraphAdam. It must end where run_train_iter does (float64)."""
    # A high inner learning rate gives meta-gradients above 10, so that the clamp acts.
    config = preset(setting, cnn_num_filters=8, number_of_training_steps_per_iter=2,
                    number_of_evaluation_steps_per_iter=2, first_order_to_second_order_epoch=0,
                    task_learning_rate=5.0)
    eager = MetaLearner(config).double()
    recorded = MetaLearner(config).double()
    recorded.load_state_dict(eager.state_dict())
    adam = GraphAdam(recorded.optimizer)
    for step in range(3):
        batch = make_task_batch(config, 2, seed=step)
        eager.run_train_iter(batch, epoch=step)
        recorded.scheduler.step(step)
        recorded.current_epoch = step  # the MSL weights follow it
        recorded.train()
        losses, _ = recorded.train_forward_prop(data_batch=recorded.prepare_batch(batch), epoch=step)
        recorded.optimizer.zero_grad()
        losses["loss"].backward()
        params = [p for p in recorded.trainable_parameters() if p.grad is not None]
        adam.initialise_state()
        largest = max(p.grad.abs().max().item() for p in recorded.classifier.parameters() if p.grad is not None)
        recorded.clamp_meta_gradients()
        if config.clamps_meta_gradients:
            assert largest > 10  # the clamp is part of what is compared
            assert max(p.grad.abs().max().item() for p in recorded.classifier.parameters() if p.grad is not None) <= 10
        graph_step(adam, params, [p.grad for p in params])
        recorded.optimizer.zero_grad()
    assert_states_match_after_adam(recorded.state_dict(), eager.state_dict(), "parameters and running stats")
    assert_same_optimizer(recorded.optimizer, eager.optimizer, exact=False)
    # The conv biases' moments are rounding noise (see assert_states_match_after_adam).
    assert_tensors_match(adam_moments(recorded), adam_moments(eager), "Adam moments", inert_floor=1.0)
