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
    losses = []
    for iteration in range(ITERS):
        out, _ = learner.run_train_iter(make_batch(config, NUM_TASKS, seed=iteration), 0)
        losses.append(out["loss"].item())
    return losses


def main() -> None:
    torch.set_num_threads(1)
    from mamlpp_fast.distributed import destroy, init_from_env

    context = init_from_env(timeout_s=60)
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
    losses = train(learner, config)
    torch.save({"state": learner.state_dict(), "losses": losses}, os.environ["TEST_OUT"])
    destroy()


if __name__ == "__main__":
    main()
