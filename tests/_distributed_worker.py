"""One rank of tests/test_distributed.py (run as a script with torchrun's environment)."""

from __future__ import annotations

import os
import warnings

import torch

from mamlpp_fast import MetaLearner, preset
from mamlpp_fast.testing import make_task_batch as make_batch

TINY = dict(cnn_num_filters=8, number_of_training_steps_per_iter=3, number_of_evaluation_steps_per_iter=3)
NUM_TASKS = 4
ITERS = 2


def config_for(second_order: bool):
    return preset("maml++_omniglot_5w1s", second_order=second_order, **TINY)


def train(learner, config):
    """Per-iteration losses, and the last iteration's target logits [NUM_TASKS, N*T, N]."""
    losses = []
    for iteration in range(ITERS):
        out, logits = learner.run_train_iter(make_batch(config, NUM_TASKS, seed=iteration), 0)
        losses.append(out["loss"].item())
    return losses, logits


def stop_on_time(context) -> None:
    """A Trainer whose ranks disagree about the time budget (as skewed clocks would): rank 0 is
    out of time after its first epoch, rank 1 is not. All ranks must stop together."""
    from mamlpp_fast.cli import CLI_PRESETS
    from mamlpp_fast.config import MAMLConfig
    from mamlpp_fast.trainer import Trainer

    config = MAMLConfig.from_dict(dict(CLI_PRESETS["synthetic-tiny"], total_epochs=3))
    minutes = 1e-9 if context.rank == 0 else 1000.0
    trainer = Trainer(config, os.environ["TEST_DIR"], progress=False, log=lambda message: None,
                      max_minutes=minutes, distributed=context)
    torch.save({"outcome": trainer.train()}, os.environ["TEST_OUT"])


def resume_from_unshared_folders(context) -> None:
    """Each rank has its own output folder (no shared file system); only rank 0's holds a
    checkpoint. Both ranks must refuse to train, with the same clear error."""
    from mamlpp_fast.cli import CLI_PRESETS
    from mamlpp_fast.config import MAMLConfig
    from mamlpp_fast.trainer import DistributedResumeError, Trainer

    config = MAMLConfig.from_dict(dict(CLI_PRESETS["synthetic-tiny"], total_epochs=2))
    folder = os.path.join(os.environ["TEST_DIR"], f"rank{context.rank}")
    if context.rank == 0:  # a finished first epoch, written by an earlier single-process run
        Trainer(config, folder, progress=False, log=lambda message: None,
                max_iters=config.total_iter_per_epoch).train()
    trainer = Trainer(config, folder, progress=False, log=lambda message: None, distributed=context)
    try:
        trainer.train()
        outcome = "trained"
    except DistributedResumeError as error:
        outcome = str(error)
    torch.save({"outcome": outcome}, os.environ["TEST_OUT"])


def fresh_run_on_different_data(context) -> None:
    """A fresh run (nothing to resume) where rank 1 reads a data set with other training classes
    than rank 0's. Both ranks must refuse to train, naming the data."""
    from mamlpp_fast.cli import CLI_PRESETS
    from mamlpp_fast.config import MAMLConfig
    from mamlpp_fast.data import DataConfigError, MetaLearningDataLoader
    from mamlpp_fast.data.synthetic import SyntheticGlyphs
    from mamlpp_fast.trainer import Trainer

    config = MAMLConfig.from_dict(dict(CLI_PRESETS["synthetic-tiny"], total_epochs=1))
    glyphs = SyntheticGlyphs(num_train_classes=40 + 10 * context.rank, num_val_classes=10, num_test_classes=10)
    data = MetaLearningDataLoader(config, dataset=glyphs.build(use_cache=False), prefetch=0)
    trainer = Trainer(config, os.environ["TEST_DIR"], progress=False, log=lambda message: None,
                      distributed=context, data=data)
    try:
        trainer.train()
        outcome = "trained"
    except DataConfigError as error:
        outcome = str(error)
    torch.save({"outcome": outcome}, os.environ["TEST_OUT"])


def threads_after_destroy(context) -> None:
    """A learner built after the group (its Adam imports torch._dynamo, and with it modules
    that bind the default group), one collective, then destroy(): no gloo thread may be left
    for the interpreter's exit, also of a control group (TEST_CONTROL_GROUP=1)."""
    from mamlpp_fast.distributed import destroy, gloo_threads

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(config_for(second_order=False))
    context.broadcast_module(learner)
    agreed = context.same_on_all_ranks(7)
    before = gloo_threads()
    destroy(context)
    torch.save({"agreed": agreed, "before": before, "after": gloo_threads()}, os.environ["TEST_OUT"])


def main() -> None:
    torch.set_num_threads(1)
    from mamlpp_fast.distributed import destroy, init_from_env

    context = init_from_env(timeout_s=60)
    if os.environ.get("TEST_CONTROL_GROUP") == "1":
        # What init_from_env builds beside NCCL, here beside gloo: the agreements must use it.
        import torch.distributed as dist

        assert context.control_group is None
        context.control_group = dist.new_group(backend="gloo")
    if os.environ.get("TEST_MODE") == "threads_after_destroy":
        threads_after_destroy(context)
        return
    if os.environ.get("TEST_MODE") == "max_minutes":
        stop_on_time(context)
        destroy(context)
        return
    if os.environ.get("TEST_MODE") == "different_data":
        fresh_run_on_different_data(context)
        destroy(context)
        return
    if os.environ.get("TEST_MODE") == "unshared_folder":
        resume_from_unshared_folders(context)
        destroy(context)
        return
    config = config_for(os.environ["TEST_SECOND_ORDER"] == "1")
    chunk = int(os.environ.get("TEST_CHUNK", "0")) or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = MetaLearner(config, task_chunk_size=chunk).double()
    if context.rank != 0:
        with torch.no_grad():  # a different init on the other ranks: the broadcast must fix it
            for param in learner.parameters():
                param.add_(1.0)
    context.broadcast_module(learner)
    learner.distributed = context
    losses, logits = train(learner, config)
    torch.save({"state": learner.state_dict(), "losses": losses, "logits": logits}, os.environ["TEST_OUT"])
    destroy(context)


if __name__ == "__main__":
    main()
