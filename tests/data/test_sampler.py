"""Episode sampler, prefetch and the config-keyed loader, on small in-memory data sets."""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest

from mamlpp_fast.data import (DataConfigError, DataError, EpisodeBatch, EpisodeSampler, FewShotDataset,
                              MetaLearningDataLoader, Prefetcher, SplitData, official_seed, split_counts)
from mamlpp_fast.data.sampler import identity_lut


def tiny_dataset(classes=(12, 6, 7), images=8, shape=(1, 6, 6), rotate=True, seed=0) -> FewShotDataset:
    rng = np.random.default_rng(seed)
    total = sum(classes)
    storage = rng.integers(0, 256, size=(total,) + (images,) + tuple(shape), dtype=np.uint8)
    perm = rng.permutation(total)
    splits, start = {}, 0
    for name, n in zip(("train", "val", "test"), classes):
        ids = perm[start:start + n].astype(np.int64)
        splits[name] = SplitData(storage, ids, np.full(n, images, dtype=np.int64),
                                 tuple(f"c{i}" for i in ids))
        start += n
    return FewShotDataset("tiny", splits, identity_lut(shape[0]), rotation_augment=rotate)


def test_official_seed_and_split_counts():
    assert official_seed(0) == 985773
    assert split_counts(1623, (0.70918052988, 0.03080714725, 0.2606284658)) == (1150, 1200, 1623)


def test_shapes_dtypes_and_label_layout():
    ds = tiny_dataset()
    s = EpisodeSampler(ds, "train", n_way=5, k_shot=2, n_target=3, batch_size=4, seed=1)
    b = s.batch(0)
    assert isinstance(b, EpisodeBatch)
    assert b.x_support.shape == (4, 5, 2, 1, 6, 6) and b.x_support.dtype == np.float32
    assert b.x_target.shape == (4, 5, 3, 1, 6, 6) and b.x_target.dtype == np.float32
    assert b.y_support.shape == (4, 5, 2) and b.y_support.dtype == np.int64
    assert b.y_target.shape == (4, 5, 3) and b.y_target.dtype == np.int64
    assert all(a.flags["C_CONTIGUOUS"] for a in b[:4])
    # class-major: label n for every sample of class n
    np.testing.assert_array_equal(b.y_support, np.broadcast_to(np.arange(5)[None, :, None], (4, 5, 2)))
    np.testing.assert_array_equal(b.y_target, np.broadcast_to(np.arange(5)[None, :, None], (4, 5, 3)))
    np.testing.assert_array_equal(b.seeds, official_seed(1) + np.arange(4))
    # support and target of a class never share an image
    for t in range(4):
        for n in range(5):
            sup = {x.tobytes() for x in b.x_support[t, n]}
            assert not sup & {x.tobytes() for x in b.x_target[t, n]}


def _official_style_task(split: SplitData, seed: int, n: int, k: int, t: int, augment: bool):
    """Straight per-image transcription of the official get_set draws, for comparison."""
    rng = np.random.RandomState(seed)
    keys = [str(i) for i in range(split.num_classes)]
    selected = rng.choice(keys, size=n, replace=False)
    rng.shuffle(selected)
    k_dict = dict(zip(selected, rng.randint(0, 4, size=n)))
    out = []
    for cls in selected:
        picks = rng.choice(int(split.counts[int(cls)]), size=k + t, replace=False)
        imgs = []
        for p in picks:
            hwc = split.storage[split.class_ids[int(cls)], p].transpose(1, 2, 0).astype(np.float32)
            if augment:
                hwc = np.rot90(hwc, k=k_dict[cls]).copy()
            imgs.append(hwc.transpose(2, 0, 1))
        out.append(np.stack(imgs))
    x = np.stack(out)
    return x[:, :k], x[:, k:]


@pytest.mark.parametrize("split,augment", [("train", True), ("train", False), ("val", False), ("test", False)])
def test_matches_official_style_per_image_sampling(split, augment):
    ds = tiny_dataset()
    s = EpisodeSampler(ds, split, n_way=4, k_shot=2, n_target=1, batch_size=3, seed=7, augment=augment)
    for it in (0, 5):
        b = s.batch(it)
        for j, seed in enumerate(b.seeds):
            xs, xt = _official_style_task(ds.splits[split], int(seed), 4, 2, 1, augment)
            np.testing.assert_array_equal(b.x_support[j], xs)
            np.testing.assert_array_equal(b.x_target[j], xt)


def test_rotation_only_in_training_by_default():
    ds = tiny_dataset(rotate=True)
    train = EpisodeSampler(ds, "train", 4, 1, 1, 8, seed=0)
    val = EpisodeSampler(ds, "val", 4, 1, 1, 8, seed=0)
    assert train.augment and not val.augment
    plain = EpisodeSampler(ds, "train", 4, 1, 1, 8, seed=0, augment=False)
    a, b = train.batch(0), plain.batch(0)
    assert not np.array_equal(a.x_support, b.x_support)  # some class was rotated
    for t, seed in enumerate(a.seeds):
        rots = np.random.RandomState(int(seed))
        rots.choice(ds.splits["train"].num_classes, 4, replace=False)
        rots.shuffle(np.zeros(4))
        ks = rots.randint(0, 4, size=4)
        for n in range(4):
            np.testing.assert_array_equal(a.x_support[t, n], np.rot90(b.x_support[t, n], ks[n], axes=(-2, -1)))
    assert not tiny_dataset(rotate=False).rotation_augment
    assert not EpisodeSampler(tiny_dataset(rotate=False), "train", 4, 1, 1, 2).augment


def test_determinism_across_instances_and_fixed_eval_tasks():
    ds = tiny_dataset()
    a = list(EpisodeSampler(ds, "val", 3, 1, 2, 4, seed=0, num_batches=3))
    b = list(EpisodeSampler(ds, "val", 3, 1, 2, 4, seed=0, num_batches=3))
    again = list(EpisodeSampler(ds, "val", 3, 1, 2, 4, seed=0, num_batches=3))
    for x, y, z in zip(a, b, again):
        for u, v, w in zip(x, y, z):
            np.testing.assert_array_equal(u, v)
            np.testing.assert_array_equal(u, w)
    test = list(EpisodeSampler(ds, "test", 3, 1, 2, 4, seed=0, num_batches=3))
    np.testing.assert_array_equal(test[0].seeds, a[0].seeds)  # test reuses the val seeds
    other = EpisodeSampler(ds, "train", 3, 1, 2, 4, seed=1).batch(0)
    assert not np.array_equal(other.seeds, EpisodeSampler(ds, "train", 3, 1, 2, 4, seed=2).batch(0).seeds)


def test_resume_continues_the_stream():
    ds = tiny_dataset()
    full = list(EpisodeSampler(ds, "train", 3, 1, 1, 4, seed=0).batches(8))
    resumed = list(EpisodeSampler(ds, "train", 3, 1, 1, 4, seed=0, start_iter=5).batches(3))
    for x, y in zip(full[5:], resumed):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(resumed[0].seeds, official_seed(0) + 5 * 4 + np.arange(4))


@pytest.mark.parametrize("kwargs,word", [
    (dict(n_way=13), "n_way"),
    (dict(k_shot=5, n_target=4), "k_shot + n_target"),
    (dict(k_shot=0), "k_shot"),
    (dict(batch_size=0), "batch_size"),
    (dict(n_target=-1), "n_target"),
    (dict(start_iter=-2), "start_iter"),
])
def test_bad_arguments_name_the_argument(kwargs, word):
    args = dict(n_way=3, k_shot=1, n_target=1, batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word.replace("+", r"\+")) as e:
        EpisodeSampler(tiny_dataset(), "train", **args)
    assert isinstance(e.value, DataError)  # the CLI reports DataErrors as data errors, no traceback
    with pytest.raises(ValueError, match="split"):
        EpisodeSampler(tiny_dataset(), "validation", 3, 1, 1, 2)


def test_prefetch_matches_direct_and_closes():
    ds = tiny_dataset()
    s = EpisodeSampler(ds, "train", 3, 1, 1, 4, seed=3)
    direct = list(s.batches(10))
    with s.prefetch(10, depth=2) as it:
        fetched = list(it)
    assert len(fetched) == 10
    for x, y in zip(direct, fetched):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    # endless stream, stopped early: the thread must end
    it = s.prefetch(None, depth=2)
    next(it)
    it.close()
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_propagates_errors_and_transform():
    def boom():
        yield 1
        yield 2
        raise KeyError("producer failed")

    it = Prefetcher(boom(), depth=1, transform=lambda v: v * 10)
    assert next(it) == 10 and next(it) == 20
    with pytest.raises(KeyError, match="producer failed"):
        next(it)
    assert not it._thread.is_alive()
    n_threads = threading.active_count()
    with pytest.raises(ZeroDivisionError):
        list(Prefetcher(range(3), transform=lambda v: 1 / (v - 1)))
    assert threading.active_count() <= n_threads


def test_to_torch():
    torch = pytest.importorskip("torch")
    b = EpisodeSampler(tiny_dataset(), "train", 3, 1, 1, 2).batch(0).to_torch()
    assert b.x_support.dtype == torch.float32 and b.y_target.dtype == torch.int64
    assert tuple(b.x_support.shape) == (2, 3, 1, 1, 6, 6)


def test_loader_with_duck_typed_config():
    ds = tiny_dataset()
    cfg = types.SimpleNamespace(dataset_name="tiny", num_classes_per_set=3, num_samples_per_class=1,
                                num_target_samples=2, batch_size=4, train_seed=0, val_seed=0,
                                num_evaluation_tasks=30, image_channels=1, unrelated="x")
    data = MetaLearningDataLoader(cfg, dataset=ds)
    val = list(data.get_val_batches())
    assert len(val) == int(30 / 4)  # official: int(num_evaluation_tasks / batch_size)
    val2 = list(data.get_val_batches())
    np.testing.assert_array_equal(val[3].x_target, val2[3].x_target)
    test = list(data.get_test_batches())
    np.testing.assert_array_equal(test[0].seeds, val[0].seeds)
    first = list(data.get_train_batches(total_batches=3, current_iter=0))
    cont = list(data.get_train_batches(total_batches=2))  # continues at iteration 3
    resumed = list(MetaLearningDataLoader(cfg, dataset=ds, prefetch=0).get_train_batches(5, current_iter=0))
    for x, y in zip(first + cont, resumed):
        np.testing.assert_array_equal(x.x_support, y.x_support)
    assert [int(b.seeds[0]) for b in first + cont] == [official_seed(0) + 4 * i for i in range(5)]
    with pytest.raises(ValueError, match="num_clases_per_set"):
        MetaLearningDataLoader(dataset=ds, num_clases_per_set=3)
    with pytest.raises(ValueError, match="image_channels"):
        MetaLearningDataLoader(dataset=ds, image_channels=3)


def test_loader_builds_synthetic_by_name(cache_tmp):
    data = MetaLearningDataLoader(dataset_name="synthetic", num_classes_per_set=5, batch_size=2,
                                  num_evaluation_tasks=4,
                                  dataset_kwargs=dict(num_train_classes=10, num_val_classes=5,
                                                      num_test_classes=5, images_per_class=4))
    (b,) = list(data.get_val_batches())[:1]
    assert b.x_support.shape == (2, 5, 1, 1, 28, 28)


@pytest.mark.parametrize("overrides,key", [
    (dict(num_classes_per_set=7), r"num_classes_per_set \(n_way\) = 7 is greater than the number of "
                                  r"classes \(6\) in the 'val' split of tiny"),
    (dict(num_samples_per_class=5, num_target_samples=4),
     r"num_samples_per_class \+ num_target_samples \(k_shot \+ n_target\) = 5 \+ 4 = 9 is greater than "
     r"the images per class \(8, the smallest class\) in the 'train' split of tiny"),
    (dict(num_samples_per_class=0), r"k_shot \(num_samples_per_class\) must be a positive integer, got 0"),
    (dict(num_target_samples=-1), r"n_target \(num_target_samples\) must be a non-negative integer"),
    (dict(batch_size=0), r"batch_size \(num_of_gpus x batch_size x samples_per_iter\) must be a positive"),
    (dict(num_classes_per_set=2.5), r"num_classes_per_set must be an integer, got 2\.5"),
    (dict(num_samples_per_class="one"), r"num_samples_per_class must be an integer, got 'one'"),
    (dict(image_channels=3), r"image_channels=3 but tiny has 1 channel"),
])
def test_loader_data_errors_name_the_config_key(overrides, key):
    """Settings that do not fit the data raise the data package's error (a ValueError too)."""
    cfg = dict(num_classes_per_set=3, num_samples_per_class=1, num_target_samples=1, batch_size=2)
    cfg.update(overrides)
    with pytest.raises(DataConfigError, match=key) as e:
        MetaLearningDataLoader(dataset=tiny_dataset(), prefetch=0, **cfg)
    assert isinstance(e.value, DataError) and isinstance(e.value, ValueError)


def test_unknown_dataset_name_is_a_data_error():
    from mamlpp_fast.data import make_dataset

    with pytest.raises(DataConfigError, match="dataset_name 'cifar' is not known"):
        make_dataset("cifar")
    with pytest.raises(DataConfigError, match="dataset_name 'cifar'"):
        MetaLearningDataLoader(dataset_name="cifar")


def test_describe():
    ds = tiny_dataset()
    assert ds.describe() == "tiny: 25 classes (train 12 / val 6 / test 7) x 8 images, 1x6x6"
    ds.info.update(root="/d/tiny", cache_hit={"train": True, "val": False, "test": True}, load_seconds=0.5,
                   layout="folders", official="3 classes", is_official=False)
    assert ds.describe() == ("tiny (folders) at /d/tiny: 25 classes (train 12 / val 6 / test 7) x 8 images, "
                             "1x6x6, cache hit for train, test, miss for val, loaded in 0.50s; NOT the "
                             "official data (3 classes), so results are not comparable with the paper's")
    assert MetaLearningDataLoader(dataset=ds, num_classes_per_set=3).describe() == ds.describe()
