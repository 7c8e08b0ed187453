"""mini-ImageNet (generated folder and pickle fixtures) and the synthetic glyph data set."""

from __future__ import annotations


import numpy as np
import pytest

from mamlpp_fast.data import (DataError, DataNotFoundError, EpisodeSampler, SyntheticGlyphs,
                              UnofficialDataWarning, make_dataset)
from mamlpp_fast.data.mini_imagenet import MEAN, STD, load_mini_imagenet
from mamlpp_fast.testing import call_collecting_warnings

# The generated mini-ImageNet fixtures are smaller than the official 64/16/20 x 600: loading them
# warns by design (the tests about that warning record it themselves, whatever the filters say).
pytestmark = pytest.mark.filterwarnings("ignore::mamlpp_fast.data.UnofficialDataWarning")


def _unofficial_warnings(fn, *args, **kwargs):
    """Call fn and return (its result, the UnofficialDataWarning messages it emitted)."""
    return call_collecting_warnings(UnofficialDataWarning, fn, *args, **kwargs)


def _reference_pixels(path):
    """Official per-image transform: resize((84,84)) -> RGB -> /255 -> ToTensor -> Normalize."""
    torch = pytest.importorskip("torch")
    from PIL import Image

    a = np.array(Image.open(path).resize((84, 84)).convert("RGB"), np.float32) / 255.0
    t = torch.from_numpy(a.transpose(2, 0, 1).copy())
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return t.sub(mean).div(std).numpy()


def test_mini_imagenet_folders(tmp_path, cache_tmp, fixture_makers):
    root = fixture_makers["mini_folders"](tmp_path / "mini_imagenet")
    ds = load_mini_imagenet(root)
    assert [ds.splits[s].num_classes for s in ("train", "val", "test")] == [3, 2, 2]
    names = ds.splits["train"].class_names
    assert list(names) == sorted(names)
    assert ds.splits["train"].storage.shape == (3, 6, 3, 84, 84)
    assert not ds.rotation_augment
    s = EpisodeSampler(ds, "train", 3, 2, 2, 2, seed=0)
    assert not s.augment
    b = s.batch(0)
    assert b.x_support.shape == (2, 3, 2, 3, 84, 84) and b.x_support.dtype == np.float32
    # exact values against the official transform, image by image
    split = ds.splits["train"]
    for c in range(3):
        files = sorted((root / "train" / names[c]).iterdir())
        for i in (0, 3):  # 0 is the grayscale JPEG
            np.testing.assert_array_equal(ds.decode(split.storage[c, i]), _reference_pixels(files[i]))
    assert load_mini_imagenet(root).info["cache_hit"] == {"train": True, "val": True, "test": True}


def test_mini_imagenet_pickles(tmp_path, fixture_makers):
    import pickle

    root = fixture_makers["mini_pickles"](tmp_path / "mini-imagenet")
    ds = make_dataset("mini_imagenet_full_size", root)
    assert ds.info["layout"] == "pickle"
    with open(root / "mini-imagenet-cache-val.pkl", "rb") as f:
        raw = pickle.load(f)
    split = ds.splits["val"]
    assert list(split.class_names) == sorted(raw["class_dict"])
    for c, wnid in enumerate(split.class_names):
        for i, row in enumerate(raw["class_dict"][wnid]):
            np.testing.assert_array_equal(split.storage[c, i], raw["image_data"][row].transpose(2, 0, 1))
    x = ds.decode(split.storage[0, 0])
    expect = (raw["image_data"][raw["class_dict"][split.class_names[0]][0]].astype(np.float32) / np.float32(255)
              - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    np.testing.assert_array_equal(x, expect.transpose(2, 0, 1))


def test_mini_imagenet_errors(tmp_path, fixture_makers):
    with pytest.raises(DataNotFoundError, match="MAMLPP_FAST_DATA_DIR"):
        load_mini_imagenet(tmp_path / "nothing")
    root = fixture_makers["mini_folders"](tmp_path / "mini")
    bad = sorted((root / "val").iterdir())[1] / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_mini_imagenet(root, use_cache=False)


def test_mini_imagenet_unofficial_counts_warn_once(tmp_path, cache_tmp, fixture_makers):
    root = fixture_makers["mini_folders"](tmp_path / "mini_imagenet")
    ds, msgs = _unofficial_warnings(load_mini_imagenet, root)
    assert len(msgs) == 1, msgs
    for needle in (str(root), "found train 3 / val 2 / test 2 classes x 6 images",
                   "100 classes (train 64 / val 16 / test 20) x 600 images", "paper"):
        assert needle in msgs[0], (needle, msgs[0])
    assert ds.info["is_official"] is False
    assert ds.describe().startswith(f"mini_imagenet (folders) at {root}: 7 classes (train 3 / val 2 / test 2) "
                                    f"x 6 images, 3x84x84, cache miss, loaded in ")
    assert ds.describe().endswith("NOT the official data (100 classes (train 64 / val 16 / test 20) x 600 "
                                  "images), so results are not comparable with the paper's")
    again = load_mini_imagenet(root)
    assert ", cache hit, " in again.describe()
    # only the splits asked for are compared
    _, msgs = _unofficial_warnings(load_mini_imagenet, root, splits=("val",))
    assert len(msgs) == 1 and "found val 2 classes" in msgs[0] and "16 classes (val 16)" in msgs[0]


def test_mini_imagenet_official_counts_do_not_warn(tmp_path, fixture_makers):
    """64/16/20 classes x 600 images (4x4 pixels keep the fixture small): no warning."""
    root = fixture_makers["mini_pickles"](tmp_path / "mini-imagenet", classes=(("train", 64), ("val", 16),
                                                                              ("test", 20)), images=600, size=4)
    ds, msgs = _unofficial_warnings(load_mini_imagenet, root, image_size=(4, 4))
    assert msgs == [] and ds.info["is_official"] is True
    assert ds.describe() == (f"mini_imagenet (pickle) at {root}: 100 classes (train 64 / val 16 / test 20) "
                             f"x 600 images, 3x4x4, not cached, loaded in {ds.info['load_seconds']:.2f}s")
    # one class short of images: warns
    import pickle

    path = root / "mini-imagenet-cache-test.pkl"
    with open(path, "rb") as f:
        d = pickle.load(f)
    first = sorted(d["class_dict"])[0]
    d["class_dict"][first] = d["class_dict"][first][:599]
    with open(path, "wb") as f:
        pickle.dump(d, f)
    _, msgs = _unofficial_warnings(load_mini_imagenet, root, image_size=(4, 4))
    assert len(msgs) == 1 and "found train 64 / val 16 / test 20 classes x 599-600 images" in msgs[0]


def test_synthetic_reproducible_and_shapes(cache_tmp):
    cfg = dict(num_train_classes=12, num_val_classes=6, num_test_classes=6, images_per_class=6)
    a = SyntheticGlyphs(**cfg).build(use_cache=False)
    b = SyntheticGlyphs(**cfg).build()
    c = SyntheticGlyphs(**cfg).build()  # from the cache
    assert c.describe().startswith("synthetic_glyphs (generated, seed 0): 24 classes (train 12 / val 6 / "
                                   "test 6) x 6 images, 1x28x28, cache hit")
    assert "NOT" not in c.describe()  # no official counts to differ from
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[s].storage, b.splits[s].storage)
        np.testing.assert_array_equal(a.splits[s].storage, c.splits[s].storage)
    assert a.splits["train"].storage.shape == (12, 6, 1, 28, 28)
    other = SyntheticGlyphs(**dict(cfg, seed=1)).build(use_cache=False)
    assert not np.array_equal(other.splits["train"].storage, a.splits["train"].storage)
    # more training classes do not change the validation classes
    more = SyntheticGlyphs(**dict(cfg, num_train_classes=20)).build(use_cache=False)
    np.testing.assert_array_equal(more.splits["val"].storage, a.splits["val"].storage)
    x = EpisodeSampler(a, "train", 5, 1, 2, 3).batch(0).x_support
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    rgb = SyntheticGlyphs(num_train_classes=3, num_val_classes=2, num_test_classes=2, images_per_class=3,
                          image_shape=(3, 84, 84)).build(use_cache=False)
    assert rgb.splits["test"].storage.shape == (2, 3, 3, 84, 84)
    with pytest.raises(ValueError, match="image_shape"):
        SyntheticGlyphs(image_shape=(2, 28, 28)).build(use_cache=False)


def test_synthetic_is_learnable_but_not_trivial(cache_tmp):
    """Pixel-space prototypes: well above chance but far from perfect."""
    ds = SyntheticGlyphs(num_train_classes=5, num_val_classes=5, num_test_classes=40, images_per_class=10).build()
    s = EpisodeSampler(ds, "test", 5, 1, 5, 16, seed=0)
    accs = []
    for b in s.batches(10):
        sup = b.x_support.reshape(16, 5, -1)
        tgt = b.x_target.reshape(16, 25, -1)
        d = ((tgt[:, :, None] - sup[:, None]) ** 2).sum(-1)
        accs.append((d.argmin(-1) == b.y_target.reshape(16, -1)).mean())
    acc = float(np.mean(accs))
    assert 0.35 < acc < 0.95, acc
