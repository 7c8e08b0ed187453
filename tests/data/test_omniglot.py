"""Omniglot loading, official split/parity, caching and error paths (tiny generated tree + real data)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import numpy as np
import pytest

from mamlpp_fast.data import (DataConfigError, DataError, DataNotFoundError, EpisodeSampler,
                              MetaLearningDataLoader, UnofficialDataWarning, official_seed, split_counts)
from mamlpp_fast.data import omniglot as omni
from mamlpp_fast.data.omniglot import load_omniglot
from mamlpp_fast.testing import call_collecting_warnings

FRACTIONS = (0.70918052988, 0.03080714725, 0.2606284658)

# The tiny generated trees are not the official 1623 classes: loading them warns by design (the
# tests that are about that warning record it themselves, whatever the filters say).
pytestmark = pytest.mark.filterwarnings("ignore::mamlpp_fast.data.UnofficialDataWarning")


def _unofficial_warnings(fn, *args, **kwargs):
    """Call fn and return (its result, the UnofficialDataWarning messages it emitted)."""
    return call_collecting_warnings(UnofficialDataWarning, fn, *args, **kwargs)


def _official_style_splits(folder, val_seed=0, fractions=FRACTIONS, indexes=(-3, -2)):
    """Transcription of the official flow: sorted labels -> JSON-style string keys -> seeded shuffle."""
    paths = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".png"):
                bits = os.path.join(dirpath, f).split("/")
                paths.setdefault("/".join(bits[i] for i in indexes), []).append(os.path.join(dirpath, f))
    labels = sorted(paths)
    data = {str(i): sorted(paths[lab]) for i, lab in enumerate(labels)}
    rng = np.random.RandomState(seed=np.random.RandomState(val_seed).randint(1, 999999))
    idx = np.arange(len(data), dtype=np.int32)
    rng.shuffle(idx)
    keys, values = list(data), list(data.values())
    data = dict(zip([keys[i] for i in idx], [values[i] for i in idx]))
    a = int(fractions[0] * len(labels))
    b = int(np.sum(fractions[:2]) * len(labels))
    ks = list(data)
    return labels, {name: {k: data[k] for k in part}
                    for name, part in (("train", ks[:a]), ("val", ks[a:b]), ("test", ks[b:]))}


def _official_style_task(split, seed, n, k, t, augment):
    from PIL import Image

    rng = np.random.RandomState(seed)
    sizes = {key: len(v) for key, v in split.items()}
    selected = rng.choice(list(sizes), size=n, replace=False)
    rng.shuffle(selected)
    k_dict = dict(zip(selected, rng.randint(0, 4, size=n)))
    out = []
    for cls in selected:
        imgs = []
        for s in rng.choice(sizes[cls], size=k + t, replace=False):
            im = Image.open(split[cls][s]).resize((28, 28), resample=Image.LANCZOS)
            hwc = np.expand_dims(np.array(im, np.float32), axis=2)
            if augment:
                hwc = np.rot90(hwc, k=k_dict[cls]).copy()
            imgs.append(hwc.transpose(2, 0, 1))  # ToTensor on a float array: CHW, no rescale
        out.append(np.stack(imgs))
    x = np.stack(out)
    return x[:, :k], x[:, k:]


def _check_parity(ds, folder, n_way, tasks=2):
    labels, splits = _official_style_splits(folder)
    assert list(ds.info["labels"]) == labels
    for name in ("train", "val", "test"):
        assert [labels[int(k)] for k in splits[name]] == list(ds.splits[name].class_names)
    for name, augment in (("train", True), ("val", False), ("test", False)):
        n = min(n_way, ds.splits[name].num_classes)
        s = EpisodeSampler(ds, name, n, 1, 2, tasks, seed=0)
        b = s.batch(3 if name == "train" else 0)
        assert s.augment == augment
        for j, seed in enumerate(b.seeds):
            xs, xt = _official_style_task(splits[name], int(seed), n, 1, 2, augment)
            np.testing.assert_array_equal(b.x_support[j], xs)
            np.testing.assert_array_equal(b.x_target[j], xt)


def test_tiny_tree_split_values_and_parity(omniglot_tree, cache_tmp):
    ds = load_omniglot(omniglot_tree, download=False)
    total = 10 + 12 + 10 + 8
    a, b, c = split_counts(total, FRACTIONS)
    assert [ds.splits[s].num_classes for s in ("train", "val", "test")] == [a, b - a, c - b]
    x = ds.splits["train"].storage
    assert x.shape == (total, 20, 1, 28, 28)
    assert set(np.unique(x)) == {0, 1} and x.mean() > 0.5  # background 1, ink 0
    batch = EpisodeSampler(ds, "train", 3, 1, 1, 2).batch(0)
    assert batch.x_support.dtype == np.float32 and set(np.unique(batch.x_support)) <= {0.0, 1.0}
    _check_parity(ds, omniglot_tree, n_way=3)


def test_class_folders_give_the_official_split_of_a_fresh_dataset_dir(omniglot_tree, cache_tmp):
    """indexes_of_folders_indicating_class=[-2, -3] labels classes "characterNN/Alphabet": the
    same classes, numbered in another sorted order, so another split, when the official code
    builds its class lists anew (it ships them built with [-3, -2])."""
    released = load_omniglot(omniglot_tree, download=False)
    swapped = load_omniglot(omniglot_tree, download=False, class_folders=(-2, -3))
    _, splits = _official_style_splits(omniglot_tree, indexes=(-2, -3))
    labels = sorted({"/".join(reversed(label.split("/"))) for label in released.info["labels"]})
    for name in ("train", "val", "test"):
        expected = ["/".join(reversed(labels[int(k)].split("/"))) for k in splits[name]]
        assert list(swapped.splits[name].class_names) == expected, name
    assert list(swapped.splits["train"].class_names) != list(released.splits["train"].class_names)
    with pytest.raises(DataConfigError, match=r"indexes_of_folders_indicating_class must be \[-3, -2\]"):
        load_omniglot(omniglot_tree, download=False, class_folders=(-2,))


def test_the_class_folders_key_reaches_the_loader_as_officially(omniglot_tree, cache_tmp):
    """The official code builds its class lists from indexes_of_folders_indicating_class, except
    for dataset_name 'omniglot_dataset', whose lists (built with [-3, -2]) it ships."""
    def train_classes(name, indexes):
        loader = MetaLearningDataLoader(dataset_name=name, dataset_path=str(omniglot_tree), num_classes_per_set=1,
                                        indexes_of_folders_indicating_class=indexes, prefetch=0)
        return list(loader.dataset.splits["train"].class_names)

    released = list(load_omniglot(omniglot_tree, download=False).splits["train"].class_names)
    swapped = list(load_omniglot(omniglot_tree, download=False, class_folders=(-2, -3)).splits["train"].class_names)
    assert train_classes("omniglot", [-3, -2]) == released
    assert train_classes("omniglot", [-2, -3]) == swapped != released
    assert train_classes("omniglot_dataset", [-2, -3]) == released  # the shipped lists
    with pytest.raises(DataConfigError, match="indexes_of_folders_indicating_class must be"):
        train_classes("omniglot", [-4, -2])
    with pytest.raises(DataConfigError, match=r"mini-ImageNet's class label must be \[-3, -2\]"):
        MetaLearningDataLoader(dataset_name="mini_imagenet_full_size", dataset_path="/nonexistent",
                               indexes_of_folders_indicating_class=[-2, -3])


@pytest.mark.parametrize("dataset_name, value, message", [
    ("omniglot_dataset", True, "sets_are_pre_split=true: the Omniglot loader implements"),
    ("omniglot_dataset", "true", "sets_are_pre_split=true: the Omniglot loader implements"),
    ("mini_imagenet_full_size", False, "sets_are_pre_split=false: the mini-ImageNet loader implements"),
    ("mini_imagenet_full_size", "maybe", "sets_are_pre_split must be true or false"),
])
def test_a_layout_the_loaders_do_not_implement_is_refused(dataset_name, value, message):
    """The official loader would build another data set (or fail): refused before any data is read."""
    with pytest.raises(DataConfigError, match=message):
        MetaLearningDataLoader(dataset_name=dataset_name, dataset_path="/nonexistent", sets_are_pre_split=value)


def test_class_order_is_sorted_labels_across_both_zips(omniglot_tree, cache_tmp):
    ds = load_omniglot(omniglot_tree, download=False)
    labels = list(ds.info["labels"])
    assert labels == sorted(labels)
    assert labels[:3] == ["Alpha/character01", "Alpha/character02", "Alpha/character03"]
    assert "Angelic/character01" in labels[10:12]  # evaluation alphabet interleaved by name


def test_cache_hit_and_invalidation(omniglot_tree, cache_tmp, fixture_makers):
    first = load_omniglot(omniglot_tree, download=False)
    assert not first.info["cache_hit"]
    second = load_omniglot(omniglot_tree, download=False)
    assert second.info["cache_hit"] and second.info["cache_file"] == first.info["cache_file"]
    np.testing.assert_array_equal(first.splits["train"].storage, second.splits["train"].storage)
    assert not [p for p in cache_tmp.iterdir() if p.name.endswith(".tmp")]
    # change one image: new content, new mtime -> a different cache entry
    target = omniglot_tree / "images_background" / "Alpha" / "character01" / "0001_01.png"
    fixture_makers["omniglot_png"](target, np.random.default_rng(99))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = load_omniglot(omniglot_tree, download=False)
    assert not third.info["cache_hit"] and third.info["cache_file"] != first.info["cache_file"]
    row = third.info["labels"].index("Alpha/character01")
    assert not np.array_equal(third.splits["train"].storage[row, 0], first.splits["train"].storage[row, 0])
    # other preprocessing -> other entry; and a corrupt cache entry is rebuilt
    assert load_omniglot(omniglot_tree, download=False, image_size=(14, 14)).info["cache_file"] != \
        third.info["cache_file"]
    with open(third.info["cache_file"], "wb") as f:
        f.write(b"not an npz")
    again = load_omniglot(omniglot_tree, download=False)
    assert not again.info["cache_hit"]
    np.testing.assert_array_equal(again.splits["train"].storage, third.splits["train"].storage)


def test_missing_image_names_the_file(omniglot_tree, cache_tmp):
    gone = omniglot_tree / "images_evaluation" / "Zeta" / "character02" / "0034_07.png"
    gone.unlink()
    with pytest.raises(DataError, match="0034_07.png") as e:
        load_omniglot(omniglot_tree, download=False)
    assert str(gone) in str(e.value)


def test_corrupt_image_names_the_file(omniglot_tree, cache_tmp):
    bad = omniglot_tree / "images_background" / "Beta_(x)" / "character03" / "0013_11.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read Omniglot image") as e:
        load_omniglot(omniglot_tree, download=False, use_cache=False)
    assert str(bad) in str(e.value)


def test_missing_folder_error_explains_where(tmp_path, monkeypatch):
    monkeypatch.delenv("MAMLPP_FAST_DATA_DIR", raising=False)
    monkeypatch.delenv("DATASET_DIR", raising=False)
    monkeypatch.setattr(omni, "network_reachable", lambda *a, **k: False)
    with pytest.raises(DataNotFoundError) as e:
        load_omniglot(tmp_path / "nowhere")
    msg = str(e.value)
    for needle in ("MAMLPP_FAST_DATA_DIR", "DATASET_DIR", "images_background", str(tmp_path / "nowhere")):
        assert needle in msg
    with pytest.raises(DataNotFoundError):
        load_omniglot(tmp_path / "nowhere", download=False)


def test_env_var_resolution(omniglot_tree, cache_tmp, monkeypatch):
    monkeypatch.setenv("MAMLPP_FAST_DATA_DIR", str(omniglot_tree.parent))  # folder containing omniglot/
    monkeypatch.delenv("DATASET_DIR", raising=False)
    assert load_omniglot(download=False).info["root"] == str(omniglot_tree)
    monkeypatch.delenv("MAMLPP_FAST_DATA_DIR")
    official = omniglot_tree.parent / "official"
    official.mkdir()
    os.symlink(omniglot_tree, official / "omniglot_dataset")
    monkeypatch.setenv("DATASET_DIR", str(official))
    assert load_omniglot(download=False).info["root"] == str(official / "omniglot_dataset")


def test_official_image_order_json(omniglot_tree, cache_tmp, tmp_path):
    ds = load_omniglot(omniglot_tree, download=False)
    labels = list(ds.info["labels"])
    listing = {}
    for i, lab in enumerate(labels):
        sub = "images_evaluation" if lab.split("/")[0] in ("Angelic", "Zeta") else "images_background"
        names = sorted(p.name for p in (omniglot_tree / sub / lab).iterdir())
        listing[str(i)] = [f"datasets/omniglot_dataset/{sub}/{lab}/{n}" for n in reversed(names)]
    order = tmp_path / "omniglot_dataset.json"
    order.write_text(json.dumps(listing))
    rev = load_omniglot(omniglot_tree, download=False, image_order=order)
    np.testing.assert_array_equal(rev.splits["train"].storage, ds.splits["train"].storage[:, ::-1])
    listing["0"][0] = listing["0"][0].replace("_20.png", "_21.png")
    order.write_text(json.dumps(listing))
    with pytest.raises(DataError, match="_21.png"):
        load_omniglot(omniglot_tree, download=False, image_order=order)


@pytest.mark.parametrize("missing", ["images_background", "images_evaluation"])
def test_partial_folder_is_refused_naming_the_missing_subfolder(omniglot_tree, cache_tmp, monkeypatch, missing):
    """One zip alone would load silently and split differently (e.g. 964 classes -> 683/30/251)."""
    shutil.rmtree(omniglot_tree / missing)
    # with a network the folder must not be topped up behind the user's back either
    monkeypatch.setattr(omni, "network_reachable", lambda *a, **k: True)
    monkeypatch.setattr(omni, "download_omniglot", lambda *a, **k: pytest.fail("download attempted"))
    for download in (False, True):
        with pytest.raises(DataError, match="incomplete Omniglot folder") as e:
            load_omniglot(omniglot_tree, download=download)
        msg = str(e.value)
        assert str(omniglot_tree / missing) in msg
        assert "images_background/<Alphabet>/<characterNN>" in msg and "images_evaluation" in msg
    # also when found through the environment, and through the lower-level scan
    monkeypatch.setenv("MAMLPP_FAST_DATA_DIR", str(omniglot_tree.parent))
    monkeypatch.delenv("DATASET_DIR", raising=False)
    with pytest.raises(DataError, match=re.escape(str(omniglot_tree / missing))):
        load_omniglot(download=False)
    with pytest.raises(DataError, match=re.escape(str(omniglot_tree / missing))):
        omni.scan_omniglot(omniglot_tree)


def test_an_interrupted_download_into_the_package_folder_is_finished(cache_tmp, monkeypatch):
    """Only images_background arrived before the download stopped: the next load fetches the
    rest instead of refusing its own half-filled folder for ever."""
    for name in ("MAMLPP_FAST_DATA_DIR", "DATASET_DIR"):
        monkeypatch.delenv(name, raising=False)
    own = cache_tmp / "data" / "omniglot"
    (own / "images_background" / "Alpha" / "character01").mkdir(parents=True)
    fetched = []
    monkeypatch.setattr(omni, "network_reachable", lambda *a, **k: True)
    monkeypatch.setattr(omni, "download_omniglot", lambda dest: fetched.append(dest) or dest)
    monkeypatch.setattr(omni, "find_dataset_dir", lambda *a, **k: own)  # nothing else on this machine
    assert omni.resolve_omniglot_root(None, download=True) == own
    assert fetched == [own]
    monkeypatch.setattr(omni, "network_reachable", lambda *a, **k: False)
    with pytest.raises(DataError, match="delete this one to download both"):
        omni.resolve_omniglot_root(None, download=True)


def test_empty_subfolder_is_refused(omniglot_tree, cache_tmp):
    shutil.rmtree(omniglot_tree / "images_evaluation")
    (omniglot_tree / "images_evaluation").mkdir()
    with pytest.raises(DataError, match="images_evaluation holds no <Alphabet>/<characterNN>/"):
        load_omniglot(omniglot_tree, download=False)


def test_unofficial_class_count_warns_once(omniglot_tree, cache_tmp):
    ds, msgs = _unofficial_warnings(load_omniglot, omniglot_tree, download=False)
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    for needle in (str(omniglot_tree), "found 40 classes x 20 images", "1623 classes",
                   "train 1150 / val 50 / test 423", "train 28 / val 1 / test 11", "paper"):
        assert needle in msg, (needle, msg)
    assert ds.info["is_official"] is False
    # images_per_class=None with uneven classes: the image count is reported too
    (omniglot_tree / "images_background" / "Alpha" / "character01" / "0001_20.png").unlink()
    _, msgs = _unofficial_warnings(load_omniglot, omniglot_tree, download=False, images_per_class=None)
    assert len(msgs) == 1 and "found 40 classes x 19-20 images" in msgs[0]


def test_describe_one_line(omniglot_tree, cache_tmp):
    first = load_omniglot(omniglot_tree, download=False)
    line = first.describe()
    assert "\n" not in line
    assert re.fullmatch(
        re.escape(f"omniglot at {omniglot_tree}: 40 classes (train 28 / val 1 / test 11) x 20 images, "
                  f"1x28x28, cache miss, loaded in ") + r"\d+\.\d\ds; NOT the official data \(1623 classes "
        r"\(train 1150 / val 50 / test 423\) x 20 images\), so results are not comparable with the paper's",
        line), line
    second = load_omniglot(omniglot_tree, download=False)
    assert ", cache hit, loaded in " in second.describe()
    assert ", cache off, " in load_omniglot(omniglot_tree, download=False, use_cache=False).describe()
    data = MetaLearningDataLoader(dataset_name="omniglot", dataset_path=str(omniglot_tree), batch_size=2,
                                  num_classes_per_set=1, prefetch=0, dataset_kwargs=dict(download=False))
    assert data.describe() == data.dataset.describe()
    assert data.describe().startswith(f"omniglot at {omniglot_tree}: 40 classes (train 28 / val 1 / test 11)")


def test_download_unpacks_atomically(tmp_path, monkeypatch):
    """An interrupted unpack must not leave a half subfolder that would later count as present."""
    import hashlib
    import zipfile

    zips = {}
    for sub in omni.SUBFOLDERS:
        zpath = tmp_path / f"{sub}.zip"
        with zipfile.ZipFile(zpath, "w") as z:
            z.writestr(f"{sub}/Alpha/character01/0001_01.png", b"png")
        zips[sub] = (str(zpath), hashlib.md5(zpath.read_bytes()).hexdigest())
    monkeypatch.setattr(omni, "OFFICIAL_ZIPS", zips)
    monkeypatch.setattr(omni.urllib.request, "urlretrieve", lambda url, dst: shutil.copyfile(url, dst))
    dest = tmp_path / "dl"
    real_extractall = zipfile.ZipFile.extractall

    def broken_extractall(self, path=None, *args, **kwargs):  # writes part of the tree, then fails
        os.makedirs(os.path.join(path, "images_background", "Alpha"))
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", broken_extractall)
    with pytest.raises(OSError, match="disk full"):
        omni.download_omniglot(dest)
    assert list(dest.iterdir()) == []  # no subfolder, no staging folder, no zip left behind
    monkeypatch.setattr(zipfile.ZipFile, "extractall", real_extractall)
    omni.download_omniglot(dest)
    assert sorted(p.name for p in dest.iterdir()) == list(omni.SUBFOLDERS)
    assert (dest / "images_evaluation" / "Alpha" / "character01" / "0001_01.png").read_bytes() == b"png"


# ----------------------------------------------------------------------------------------------
# Real data (skipped when absent)

@pytest.mark.data
def test_real_split_sizes_and_values(real_omniglot):
    ds = real_omniglot
    assert [ds.splits[s].num_classes for s in ("train", "val", "test")] == [1150, 50, 423]
    assert len(ds.info["labels"]) == 1623
    ids = [set(ds.splits[s].class_ids.tolist()) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 1623
    x = ds.splits["train"].storage
    assert x.shape == (1623, 20, 1, 28, 28) and set(np.unique(x)) == {0, 1}
    assert official_seed(0) == 985773


@pytest.mark.data
def test_real_parity_with_official_style_reference(real_omniglot):
    _check_parity(real_omniglot, real_omniglot.info["root"], n_way=20, tasks=2)


@pytest.mark.data
def test_real_second_load_is_fast_and_sampler_speed(real_omniglot, real_omniglot_cache):
    from mamlpp_fast.data.omniglot import load_omniglot as load

    t = time.perf_counter()
    again, msgs = _unofficial_warnings(load, real_omniglot.info["root"], cache_folder=real_omniglot_cache,
                                       download=False)
    took = time.perf_counter() - t
    assert again.info["cache_hit"]
    assert msgs == [] and again.info["is_official"] is True  # the official data: no warning
    assert again.describe().startswith(
        f"omniglot at {again.info['root']}: 1623 classes (train 1150 / val 50 / test 423) x 20 images, "
        f"1x28x28, cache hit, loaded in ")
    assert "NOT" not in again.describe()
    assert took < 2.0, f"cached load took {took:.2f}s"
    s = EpisodeSampler(again, "train", 20, 1, 1, 8, seed=0)
    s.batch(0)
    t = time.perf_counter()
    n = 200
    for _ in s.batches(n):
        pass
    rate = n / (time.perf_counter() - t)
    print(f"\n[data] real Omniglot cached load {took:.2f}s; sampler 20w1s B=8: {rate:.0f} batches/s")
    assert rate > 20
