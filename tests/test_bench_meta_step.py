"""benchmarks/bench_meta_step.py builds and runs every kind of provider (a broken provider would
cost a whole GPU lease's benchmark step)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mamlpp_fast import preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_meta_step import make_provider, random_batch  # noqa: E402


@pytest.mark.filterwarnings("ignore:mamlpp_fast. CUDA graphs need a CUDA device")  # +graphs on the CPU runs eagerly
@pytest.mark.parametrize("name", ["reference", "mamlpp_fast", "mamlpp_fast:aten+explicit+cudnnbench",
                                  "mamlpp_fast+bmm/auto/auto/explicit", "mamlpp_fast+graphs+eageradam", "mamlpp_fast+nchw",
                                  "mamlpp_fast+grouped+nhwc", "mamlpp_fast+bf16", "mamlpp_fast+onednnwgrad",
                                  "torchfunc", "reference+bf16"])
def test_every_provider_kind_runs_a_meta_step(name):
    import torch

    config = preset("maml++_omniglot_5w1s", batch_size=2, number_of_training_steps_per_iter=1,
                    number_of_evaluation_steps_per_iter=1, cnn_num_filters=4)
    before = torch.backends.cudnn.benchmark
    max_c_in = sys.modules["mamlpp_fast.ops.task_conv"].CPU_WEIGHT_GRAD_MAX_C_IN
    make_provider(name, config, torch.float32, "cpu")(random_batch(config))
    assert torch.backends.cudnn.benchmark == before  # +cudnnbench restores the global flag
    assert sys.modules["mamlpp_fast.ops.task_conv"].CPU_WEIGHT_GRAD_MAX_C_IN == max_c_in  # +onednnwgrad restores it


def test_unknown_provider_options_are_refused():
    import torch

    config = preset("maml++_omniglot_5w1s", batch_size=1)
    for name in ("mamlpp_fast+fast", "mamlpp_fast+bmm/fast/auto/auto", "mamlpp_fast+bmm+triton"):
        with pytest.raises(ValueError, match="unknown or conflicting provider option"):
            make_provider(name, config, torch.float32, "cpu")
    with pytest.raises(ValueError, match="eageradam is a variant of \\+graphs"):
        make_provider("mamlpp_fast+eageradam", config, torch.float32, "cpu")
    with pytest.raises(ValueError, match="two layouts"):
        make_provider("mamlpp_fast+nchw+nhwc", config, torch.float32, "cpu")
    for name in ("reference+graphs", "torchfunc+bf16+nhwc"):
        with pytest.raises(ValueError, match="take one option, \\+bf16"):
            make_provider(name, config, torch.float32, "cpu")
    with pytest.raises(ValueError, match="has no bfloat16 variant"):
        make_provider("torchfunc+bf16", config, torch.float32, "cpu")


def test_bfloat16_reference_runs_its_convolutions_in_bfloat16():
    """reference+bf16, the like-for-like baseline of mamlpp_fast+bf16: every convolution of its
    network passes in bfloat16 (autocast), its meta-loss near the float32 one but not equal."""
    import torch

    from bench_meta_step import AutocastReference
    from mamlpp_fast.reference import MAMLFewShotClassifier
    from mamlpp_fast.testing import convolution_input_dtypes

    config = preset("maml++_omniglot_5w1s", batch_size=2, number_of_training_steps_per_iter=2,
                    number_of_evaluation_steps_per_iter=2, cnn_num_filters=8)
    batch = random_batch(config)
    losses = {}
    for cls in (MAMLFewShotClassifier, AutocastReference):
        torch.manual_seed(0)
        learner = cls(config)
        with convolution_input_dtypes() as seen:
            loss, logits = learner.train_forward_prop(learner.prepare_batch(batch), epoch=0)
        losses[cls] = loss["loss"].item()
        assert logits.dtype == torch.float32
        assert seen == ({torch.bfloat16} if cls is AutocastReference else {torch.float32}), cls
    relative = abs(losses[AutocastReference] - losses[MAMLFewShotClassifier]) / losses[MAMLFewShotClassifier]
    # MetaLearner(autocast_dtype="bfloat16") is 2-4% off float32 at this shape (inputs rounded to
    # bfloat16, amplified by the inner loop); 10% catches a float32 run and a broken one.
    assert 0 < relative < 1e-1, losses


def test_profile_by_op_wall_clock_lists_the_ops_of_a_meta_step():
    # A subprocess: the profiler keeps freed host memory (a process-wide allocator setting).
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_meta_step.py"
    run = subprocess.run([sys.executable, str(script), "--setting", "maml++_omniglot_5w1s", "--device", "cpu",
                          "--threads", "1", "--rows", "4", "--by-op-wall"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| aten.convolution" in run.stdout and "ms timed per op" in run.stdout, run.stdout[-2000:]
