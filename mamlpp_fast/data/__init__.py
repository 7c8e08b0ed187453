"""Few-shot data: Omniglot, mini-ImageNet, synthetic glyphs, and the official task sampler.

Typical use::

    from mamlpp_fast.data import MetaLearningDataLoader
    data = MetaLearningDataLoader(config)            # any object with the official arg names
    for x_s, x_t, y_s, y_t, seeds in data.get_train_batches(total_batches=500, current_iter=0):
        ...

or, lower level::

    ds = make_dataset("omniglot_dataset")             # or "mini_imagenet_full_size", "synthetic"
    sampler = EpisodeSampler(ds, "train", n_way=20, k_shot=1, n_target=1, batch_size=8, seed=0)
    with sampler.prefetch(num_batches=100) as it:
        for batch in it: ...
"""

from .paths import DataConfigError, DataError, DataNotFoundError, UnofficialDataWarning
from .sampler import (
    EpisodeBatch,
    EpisodeSampler,
    FewShotDataset,
    MetaLearningDataLoader,
    Prefetcher,
    SplitData,
    build_batch,
    draw_task,
    make_dataset,
    official_seed,
    split_counts,
    to_torch,
)

__all__ = [
    "DataConfigError", "DataError", "DataNotFoundError", "UnofficialDataWarning", "EpisodeBatch",
    "EpisodeSampler", "FewShotDataset",
    "MetaLearningDataLoader", "Prefetcher", "SplitData", "build_batch", "draw_task", "make_dataset",
    "official_seed", "split_counts", "to_torch", "load_omniglot", "load_mini_imagenet", "SyntheticGlyphs",
]


def __getattr__(name):  # lazy: keep `import mamlpp_fast.data` light
    if name == "load_omniglot":
        from .omniglot import load_omniglot
        return load_omniglot
    if name == "load_mini_imagenet":
        from .mini_imagenet import load_mini_imagenet
        return load_mini_imagenet
    if name == "SyntheticGlyphs":
        from .synthetic import SyntheticGlyphs
        return SyntheticGlyphs
    raise AttributeError(name)
