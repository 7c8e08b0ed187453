"""mini-ImageNet (Ravi & Larochelle split: 64/16/20 classes), from image folders or pickles.

Two layouts are read:

* folders ``<root>/{train,val,test}/<wnid>/*.jpg`` (the official ``mini_imagenet_full_size``);
* pickles ``<root>/mini-imagenet-cache-{train,val,test}.pkl`` holding ``image_data``
  (uint8 [N, 84, 84, 3]) and ``class_dict`` ({wnid: [row indices]}).

Official semantics (HowToTrainYourMAMLPytorch, data.py, ``sets_are_pre_split=True``): classes of
a split in sorted wnid order; each image ``PIL.Image.open(p).resize((84, 84)).convert('RGB')``
(no ``resample`` argument: Pillow's default, BICUBIC since Pillow 7, NEAREST before), then
``/255`` and ``Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))``; no augmentation.
Images inside a class are sorted by file name (the official order is ``os.walk`` order, which
depends on the file system).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import cache as _cache
from .paths import (DataConfigError, DataError, DataNotFoundError, UnofficialDataWarning, cache_dir,
                    describe_search, find_dataset_dir)
from .sampler import SPLITS, FewShotDataset, SplitData, count_text, normalize_lut

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FOLDER_NAMES = ("mini_imagenet", "mini_imagenet_full_size", "mini-imagenet", "miniImageNet")
PREPROCESS_VERSION = 1
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OFFICIAL_CLASSES = {"train": 64, "val": 16, "test": 20}   # Ravi & Larochelle
OFFICIAL_IMAGES_PER_CLASS = 600


def _pickle_path(root: Path, split: str) -> Path:
    return root / f"mini-imagenet-cache-{split}.pkl"


def _looks_like_mini(p: Path) -> bool:
    return (p / "train").is_dir() or _pickle_path(p, "train").is_file()


def resolve_mini_imagenet_root(root=None) -> Path:
    found = find_dataset_dir(root, FOLDER_NAMES, _looks_like_mini)
    if found is None:
        raise DataNotFoundError(
            "mini-ImageNet not found (it is never downloaded automatically).\n"
            f"{describe_search(root, FOLDER_NAMES)}\n"
            "expected layout: <folder>/{train,val,test}/<wnid>/*.jpg (64/16/20 classes) or "
            "<folder>/mini-imagenet-cache-{train,val,test}.pkl")
    return found


def _load_rgb_class(args) -> np.ndarray:
    """Decode one class to uint8 [n, 3, H, W] (top level: runs in worker processes)."""
    from PIL import Image

    paths, height, width, resample = args
    out = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                # official order: resize first, then convert('RGB')
                r = im.resize((width, height)) if resample is None else im.resize((width, height), resample=resample)
                a = np.asarray(r.convert("RGB"))
        except Exception as exc:
            raise DataError(f"cannot read mini-ImageNet image {p}: {type(exc).__name__}: {exc}") from None
        out[i] = a.transpose(2, 0, 1)
    return out


def _resize_array(images: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """uint8 [N, h, w, 3] -> uint8 [N, 3, height, width]."""
    if images.shape[1:3] == (height, width):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    from PIL import Image

    out = np.empty((len(images), 3, height, width), dtype=np.uint8)
    for i, a in enumerate(images):
        im = Image.fromarray(a)
        r = im.resize((width, height)) if resample is None else im.resize((width, height), resample=resample)
        out[i] = np.asarray(r.convert("RGB")).transpose(2, 0, 1)
    return out


def _split_from_pickle(path: Path, height: int, width: int, resample) -> SplitData:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f)
        images = np.asarray(d["image_data"])
        class_dict = d["class_dict"]
    except Exception as exc:
        raise DataError(f"cannot read mini-ImageNet pickle {path}: {type(exc).__name__}: {exc}") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: image_data must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    names = sorted(class_dict)
    counts = np.asarray([len(class_dict[n]) for n in names], dtype=np.int64)
    storage = np.zeros((len(names), int(counts.max()), 3, height, width), dtype=np.uint8)
    for i, n in enumerate(names):
        idx = np.asarray(class_dict[n], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
            raise DataError(f"{path}: class_dict[{n!r}] indexes outside image_data (N={len(images)})")
        storage[i, : len(idx)] = _resize_array(images[idx], height, width, resample)
    return SplitData(storage=storage, class_ids=np.arange(len(names), dtype=np.int64), counts=counts,
                     class_names=tuple(names))


def _scan_split(folder: Path):
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    files, stats = [], []
    for c in classes:
        fl = sorted((e for e in os.scandir(folder / c) if e.is_file() and e.name.lower().endswith(_IMAGE_SUFFIXES)),
                    key=lambda e: e.name)
        if not fl:
            raise DataError(f"mini-ImageNet class folder {folder / c} holds no images")
        files.append([Path(e.path) for e in fl])
        for e in fl:
            st = e.stat()
            stats.append((f"{folder.name}/{c}/{e.name}", st.st_size, st.st_mtime_ns))
    return classes, files, stats


def _decode_split(files, height, width, resample, workers) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray([len(f) for f in files], dtype=np.int64)
    storage = np.zeros((len(files), int(counts.max()), 3, height, width), dtype=np.uint8)
    jobs = [([str(p) for p in fl], height, width, resample) for fl in files]
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers > 1 and counts.sum() >= 1000 and "fork" in mp.get_all_start_methods():
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
            for i, arr in enumerate(ex.map(_load_rgb_class, jobs, chunksize=1)):
                storage[i, : len(arr)] = arr
    else:
        for i, job in enumerate(jobs):
            arr = _load_rgb_class(job)
            storage[i, : len(arr)] = arr
    return storage, counts


def load_mini_imagenet(root=None, *, image_size=(84, 84), resample=None, use_cache: bool = True,
                       cache_folder: Optional[os.PathLike | str] = None, workers: Optional[int] = None,
                       layout: str = "auto", splits: Sequence[str] = SPLITS,
                       verbose: bool = False) -> FewShotDataset:
    """Load mini-ImageNet into memory (uint8) with the official normalisation table.

    ``layout`` is ``"folders"``, ``"pickle"`` or ``"auto"`` (folders when ``train/`` exists).
    ``resample=None`` calls ``resize`` without a filter, as the official code does.

    If the loaded splits are not the official 64/16/20 classes x 600 images, one
    :class:`UnofficialDataWarning` says so. ``FewShotDataset.describe()`` gives a one-line
    summary of what was loaded.
    """
    height, width = (int(image_size), int(image_size)) if np.isscalar(image_size) else map(int, image_size)
    t0 = time.perf_counter()
    folder = resolve_mini_imagenet_root(root)
    if layout == "auto":
        layout = "folders" if (folder / "train").is_dir() else "pickle"
    if layout not in ("folders", "pickle"):
        raise DataConfigError(f"layout must be 'auto', 'folders' or 'pickle', got {layout!r}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataConfigError(f"splits must be drawn from {list(SPLITS)}, got {list(splits)!r}")
    out: dict[str, SplitData] = {}
    hits = {}
    for split in splits:
        if layout == "pickle":
            p = _pickle_path(folder, split)
            if not p.is_file():
                raise DataError(f"missing mini-ImageNet pickle {p}")
            out[split] = _split_from_pickle(p, height, width, resample)
            continue
        sub = folder / split
        if not sub.is_dir():
            raise DataError(f"missing mini-ImageNet split folder {sub}")
        names, files, stats = _scan_split(sub)
        params = {"kind": "mini_imagenet", "version": PREPROCESS_VERSION, "height": height, "width": width,
                  "resample": str(resample), "split": split}
        fp = _cache.fingerprint(stats, params)
        entry = _cache.entry_path(Path(cache_folder) if cache_folder is not None else cache_dir(),
                                  f"mini_imagenet-{split}", fp)
        got = _cache.load(entry) if use_cache else None
        if got is not None and list(got.get("names", [])) == names:
            storage, counts = got["storage"], got["counts"]
            hits[split] = True
        else:
            storage, counts = _decode_split(files, height, width, resample, workers)
            hits[split] = False
            if use_cache:
                _cache.save(entry, {"storage": storage, "counts": counts, "names": np.asarray(names)})
        out[split] = SplitData(storage=storage, class_ids=np.arange(len(names), dtype=np.int64),
                               counts=np.asarray(counts, dtype=np.int64), class_names=tuple(names))
    official, is_official = _check_official(folder, out)
    elapsed = time.perf_counter() - t0
    ds = FewShotDataset(name="mini_imagenet", splits=out, lut=normalize_lut(MEAN, STD),
                        rotation_augment=False,
                        info={"root": str(folder), "layout": layout, "cache_hit": hits,
                              "use_cache": bool(use_cache), "load_seconds": elapsed, "official": official,
                              "is_official": is_official})
    if verbose:
        print(ds.describe())
    return ds


def _check_official(folder: Path, out: dict[str, SplitData]) -> tuple[str, bool]:
    """Compare the loaded splits with the official 64/16/20 classes x 600 images; warn once if
    they differ. Returns (the official counts as text, whether the loaded splits match them)."""
    names = [s for s in SPLITS if s in out]
    official = (f"{sum(OFFICIAL_CLASSES[s] for s in names)} classes ("
                + " / ".join(f"{s} {OFFICIAL_CLASSES[s]}" for s in names)
                + f") x {OFFICIAL_IMAGES_PER_CLASS} images")
    counts = np.concatenate([out[s].counts for s in names]) if names else np.zeros(0, np.int64)
    is_official = (all(out[s].num_classes == OFFICIAL_CLASSES[s] for s in names)
                   and bool(np.all(counts == OFFICIAL_IMAGES_PER_CLASS)))
    if not is_official:
        found = " / ".join(f"{s} {out[s].num_classes}" for s in names)
        warnings.warn(
            f"mini_imagenet at {folder}: found {found} classes x {count_text(counts)} images, but the "
            f"official mini-ImageNet has {official}, so the tasks, and comparisons with the paper's "
            f"results, differ.", UnofficialDataWarning, stacklevel=3)
    return official, is_official
