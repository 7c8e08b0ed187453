"""MetaLearner(autocast_dtype=...): opt-in mixed precision. The convolutions and the classifier
run in the low-precision dtype, the batch-norm stage, losses, weights and updates in float32;
a float64 learner is unaffected; bad values are refused by name."""

from __future__ import annotations

import warnings

import pytest
import torch

import mamlpp_fast.meta_learner as meta_learner_module
from mamlpp_fast import MetaLearner, _backend, preset
from mamlpp_fast.mixed_precision import check_autocast_dtype
from mamlpp_fast.testing import make_task_batch

TINY = dict(cnn_num_filters=8, number_of_training_steps_per_iter=2, number_of_evaluation_steps_per_iter=2,
            batch_size=2)


def tiny_learner(dtype=torch.float32, state=None, **options):
    config = preset("maml++_omniglot_5w1s", second_order=True, **TINY)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(config, device="cpu", dtype=dtype, **options)
    if state is not None:
        learner.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    return learner


def batch_in(learner, dtype):
    # Drawn in float64 and cast, so that every dtype sees the same images.
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in make_task_batch(learner.config, 2, seed=1))


@pytest.mark.parametrize("value, expected", [(None, None), ("bfloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_accepted_values(value, expected):
    assert check_autocast_dtype(value) is expected
    assert tiny_learner(autocast_dtype=value).autocast_dtype is expected


@pytest.mark.parametrize("value", ["bf16", "float32", torch.float32, torch.float64, 16, "float16", torch.float16])
def test_bad_values_name_the_argument(value):
    with pytest.raises(ValueError, match="autocast_dtype must be None or 'bfloat16'") as caught:
        tiny_learner(autocast_dtype=value)
    assert ("loss scaling" in str(caught.value)) == (value in ("float16", torch.float16))


@pytest.mark.parametrize("memory_format", ["auto", "contiguous"])
def test_bfloat16_runs_the_convolutions_low_and_the_rest_in_float32(monkeypatch, memory_format):
    # "auto" is channels-last on the CPU, where the compiled stage reads and writes bfloat16
    # (float32 arithmetic) itself: every convolution's bfloat16 output goes to it as it is. In
    # NCHW (or without the compiled ops) the stage takes float32: the convolutions' outputs are
    # cast up, except the few-channel first layer's, which stays float32 throughout (task_conv's
    # own autocast casts its inputs, so a first layer left under autocast would come out bfloat16).
    native = memory_format == "auto" and _backend.has_extension()
    conv_outputs, stage_inputs = [], []
    real_conv, real_stage = meta_learner_module.task_conv, MetaLearner._stage

    def spy_conv(x, *args, **kwargs):
        out = real_conv(x, *args, **kwargs)
        conv_outputs.append((x.shape[1] // 2, out.dtype))  # (input channels per task, output dtype); B = 2
        return out

    def spy_stage(self, x, weight, bias):
        stage_inputs.append(x.dtype)
        return real_stage(self, x, weight, bias)

    monkeypatch.setattr(meta_learner_module, "task_conv", spy_conv)
    monkeypatch.setattr(MetaLearner, "_stage", spy_stage)
    learner = tiny_learner(autocast_dtype="bfloat16", memory_format=memory_format)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    losses, logits = learner.run_train_iter(batch_in(learner, torch.float32), epoch=0)
    if native:
        assert conv_outputs and set(conv_outputs) == {(1, torch.bfloat16), (8, torch.bfloat16)}
        assert stage_inputs and set(stage_inputs) == {torch.bfloat16}
    else:
        assert conv_outputs and set(conv_outputs) == {(1, torch.float32), (8, torch.bfloat16)}
        assert stage_inputs and set(stage_inputs) == {torch.float32}
    assert logits.dtype == torch.float32 and torch.isfinite(torch.as_tensor(losses["loss"])).all()
    # The meta-parameters stay float32 and all of them that the official code trains moved.
    for name, param in learner.named_parameters():
        assert param.dtype == torch.float32, name
        if param.requires_grad and "conv.bias" not in name and not name.endswith("conv-bias"):
            assert not torch.equal(param.detach(), before[name]), name


def test_bfloat16_computes_the_same_network_to_its_rounding():
    # The plain network (no inner step): logits within bfloat16's rounding of float32's. After
    # inner steps only a loose bound holds: the inner loop amplifies rounding, and a rounding that
    # flips a max-pool argmax or a leaky-ReLU sign routes gradients elsewhere (the meta-gradients
    # can differ by O(1) at low precision, as float32 against float64 does more rarely).
    reference = tiny_learner()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    low = tiny_learner(state=state, autocast_dtype="bfloat16")
    _, x_target, _, _ = batch_in(reference, torch.float32)
    logits = {}
    for name, learner in (("float32", reference), ("bfloat16", low)):
        fast = learner._initial_fast_weights(2, track_meta_gradients=False)  # the meta-parameters
        logits[name] = learner.predict(x_target, fast, step=0).detach()
    assert logits["bfloat16"].dtype == torch.float32
    error = ((logits["bfloat16"] - logits["float32"]).norm() / logits["float32"].norm()).item()
    assert 0 < error < 2e-2, error
    losses = {name: learner.forward(batch_in(learner, torch.float32), 0, True, True, 2, True)[0]["loss"].item()
              for name, learner in (("float32", reference), ("bfloat16", low))}
    assert abs(losses["bfloat16"] - losses["float32"]) <= 0.2 * losses["float32"], losses


def test_a_float64_learner_is_unaffected():
    plain = tiny_learner(torch.float64)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    optioned = tiny_learner(torch.float64, state=state, autocast_dtype="bfloat16")
    batch = batch_in(plain, torch.float64)
    for learner in (plain, optioned):
        learner.zero_grad()
        learner.forward(batch, 0, True, True, 2, True)[0]["loss"].backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), optioned.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_the_recorded_graphs_are_keyed_on_the_autocast_dtype():
    # A CUDA graph recorded in one precision must not be replayed in another.
    learner = tiny_learner()
    batch = batch_in(learner, torch.float32)
    before = learner.graphs._key(batch, 0, None)
    learner.autocast_dtype = "bfloat16"
    assert learner.graphs._key(batch, 0, None) != before


@pytest.mark.cuda
def test_bfloat16_on_cuda_eager_and_graphed():
    # Both kinds of run train (finite losses, float32 parameters that move), and the graphed
    # one records its meta-step instead of falling back to eager mode.
    config = preset("maml++_omniglot_5w1s", second_order=True, **TINY)
    batches = [tuple(t.cuda() for t in make_task_batch(config, 2, seed=s, dtype=torch.float32)) for s in range(3)]
    for graphs in (False, True):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner = MetaLearner(config, device="cuda", dtype=torch.float32, cuda_graphs=graphs,
                                  autocast_dtype="bfloat16")
        before = {name: p.detach().clone() for name, p in learner.named_parameters()}
        for batch in batches:
            losses, logits = learner.run_train_iter(batch, epoch=0)
            assert torch.isfinite(torch.as_tensor(losses["loss"])).all() and logits.dtype == torch.float32
        moved = [name for name, p in learner.named_parameters() if not torch.equal(p.detach(), before[name])]
        assert all(p.dtype == torch.float32 for p in learner.parameters()) and moved
        if graphs:
            assert learner.graphs.captures == 1 and learner.graphs.replays == len(batches)


def test_few_channel_convolutions_stay_float32_under_autocast():
    # The first layer (1 or 3 image channels) is bound by memory: it runs in float32 with autocast
    # off, on float32 inputs without a copy; the wider layers keep autocast's dtype.
    from mamlpp_fast.mixed_precision import float32_conv, float32_output, runs_in_float32
    from mamlpp_fast.ops import task_conv

    assert runs_in_float32(1) and runs_in_float32(3) and not runs_in_float32(8)
    x = torch.randn(2, 2 * 3, 5, 5)
    weight, bias = torch.randn(2, 16, 3, 3, 3), torch.randn(2, 16)
    seen = []

    def conv(x_, w_, b_):
        seen.append((x_ is x, torch.is_autocast_enabled("cpu")))
        return task_conv(x_, w_, b_)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = float32_conv(conv, x, weight, bias)
        lowered = float32_output(task_conv, x, weight, bias)
    assert seen == [(True, False)]
    assert kept.dtype == torch.float32 and torch.equal(kept, task_conv(x, weight, bias))
    assert lowered.dtype == torch.float32 and not torch.equal(lowered, kept)  # bfloat16 arithmetic


@pytest.mark.skipif(not _backend.has_extension(), reason="needs the compiled bn_lrelu_pool kernels")
def test_the_bfloat16_stage_computes_what_casting_around_a_float32_stage_does(monkeypatch):
    # Channels-last on the CPU, the fused stage reads the convolutions' bfloat16 outputs and writes
    # bfloat16 itself (float32 arithmetic). Against the same learner with casts around a float32
    # stage (and the first convolution in bfloat16 too): the losses of a second-order pass (inner
    # loop included) and its query logits agree bit for bit, since each value is rounded once, at
    # the same place, either way.
    native = tiny_learner(autocast_dtype="bfloat16")
    assert native._stage_reads_bfloat16()
    state = {k: v.clone() for k, v in native.state_dict().items()}
    casting = tiny_learner(state=state, autocast_dtype="bfloat16")
    batch = batch_in(native, torch.float32)

    # The convolutions' biases (and their rates) are left out: batch norm cancels them, so their
    # true meta-gradient is 0 and what either run computes is rounding noise.
    names = [name for name, p in native.named_parameters() if p.requires_grad and "conv-bias" not in name
             and "conv.bias" not in name]

    def second_order_pass(learner):
        losses, logits = learner.forward(batch, 0, True, True, 2, True)
        params = dict(learner.named_parameters())
        grads = torch.autograd.grad(losses["loss"], [params[name] for name in names])
        return losses["loss"].detach(), logits.detach(), grads

    native_loss, native_logits, native_grads = second_order_pass(native)
    monkeypatch.setattr(MetaLearner, "_stage_reads_bfloat16", lambda self: False)
    monkeypatch.setattr(meta_learner_module, "runs_in_float32", lambda c_in: False)
    casting_loss, casting_logits, casting_grads = second_order_pass(casting)
    assert torch.equal(native_loss, casting_loss) and torch.equal(native_logits, casting_logits)
    # The outer backward adds two paths' gradients of an activation in bfloat16 here and in float32
    # there (the forward, and so every argmax, being the same): the meta-gradients differ by
    # bfloat16 rounding only.
    for name, a, b in zip(names, native_grads, casting_grads):
        if b.any():
            assert ((a - b).norm() / b.norm()).item() < 3e-2, name
