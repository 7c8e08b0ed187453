"""Omniglot, read and split as the official MAML++ code does.

Layout: ``<root>/images_background/<Alphabet>/<characterNN>/*.png`` and the same under
``images_evaluation`` (the two official zips unpacked). A class is ``"<Alphabet>/<characterNN>"``.

Official semantics reproduced here (HowToTrainYourMAMLPytorch, data.py):

* the 1623 class labels are listed in Python ``sorted`` order of ``"Alphabet/characterNN"``
  (both zips merged), which is also the order of the committed ``map_to_label_name_omniglot_dataset.json``;
* ``RandomState(RandomState(val_seed).randint(1, 999999)).shuffle(arange(1623, dtype=int32))``
  reorders them, then ``int(f0*1623)`` and ``int(sum(f[:2])*1623)`` cut train/val/test
  (1150/50/423 with the released fractions);
* each image: ``PIL.Image.open``, ``resize((28, 28), LANCZOS)`` (Pillow uses NEAREST for the
  1-bit source images), ``np.float32``: values {0, 1}, background 1, no normalisation.

Not reproducible bit-for-bit from the images alone: the order of the 20 images inside a class.
The official code lists them in ``os.walk`` order of the author's file system (recorded in the
committed ``datasets/omniglot_dataset.json``); here they are sorted by file name unless that
JSON is passed as ``image_order=``, in which case its order is used exactly.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
import urllib.request
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import cache as _cache
from .paths import (DataConfigError, DataError, DataNotFoundError, UnofficialDataWarning, cache_dir,
                    describe_search, find_dataset_dir)
from .sampler import (OMNIGLOT_CLASS_FOLDERS, FewShotDataset, SplitData, count_text, identity_lut, official_seed,
                      split_counts)

OMNIGLOT_SPLIT_FRACTIONS = (0.70918052988, 0.03080714725, 0.2606284658)
SUBFOLDERS = ("images_background", "images_evaluation")
OFFICIAL_NUM_CLASSES = 1623          # 964 in images_background + 659 in images_evaluation
OFFICIAL_IMAGES_PER_CLASS = 20
FOLDER_NAMES = ("omniglot", "omniglot_dataset")
PREPROCESS_VERSION = 1
OFFICIAL_ZIPS = {
    "images_background": ("https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
                          "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": ("https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
                          "6b91aef0f799c5bb55b94e3f2daec811"),
}


LAYOUT = ("expected layout: <folder>/images_background/<Alphabet>/<characterNN>/<ID>_<RR>.png and "
          "<folder>/images_evaluation/<Alphabet>/<characterNN>/<ID>_<RR>.png (the official "
          "images_background.zip and images_evaluation.zip from "
          "github.com/brendenlake/omniglot/tree/master/python, both unzipped into <folder>)")


def _has_omniglot_subfolder(p: Path) -> bool:
    """At least one official subfolder: enough to stop the search here (and then to say what is
    missing), not enough to load."""
    return any((p / s).is_dir() for s in SUBFOLDERS)


def _require_both_subfolders(root: Path) -> None:
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        present = [s for s in SUBFOLDERS if s not in missing]
        raise DataError(
            f"incomplete Omniglot folder {root}: missing {', '.join(str(root / m) for m in missing)}"
            + (f" (found only {', '.join(present)})" if present else "")
            + f". The official split is drawn from the {OFFICIAL_NUM_CLASSES} classes of both "
            f"subfolders, so one alone would give a different split. Add the missing folder (or "
            f"delete this one to download both).\n{LAYOUT}")


# ----------------------------------------------------------------------------------------------
# Scanning

def scan_omniglot(root: Path, images_per_class: Optional[int] = 20):
    """List classes (sorted labels) and their image files (sorted by name).

    Returns ``(labels, files, stat_entries)`` where ``files[i]`` lists the paths (str) of class
    ``labels[i]`` and ``stat_entries`` is ``[(relpath, size, mtime_ns), ...]`` for the cache
    fingerprint. Raises :class:`DataError` naming the files when a class has images missing, and
    naming the folder when ``images_background`` or ``images_evaluation`` is missing or empty.
    """
    classes: dict[str, list[tuple[str, str]]] = {}
    stats: list[tuple[str, int, int]] = []
    _require_both_subfolders(root)
    for sub in SUBFOLDERS:
        top = root / sub
        before = len(classes)
        for alpha in sorted(os.scandir(top), key=lambda e: e.name):
            if not alpha.is_dir():
                continue
            for char in sorted(os.scandir(alpha.path), key=lambda e: e.name):
                if not char.is_dir():
                    continue
                label = f"{alpha.name}/{char.name}"
                if label in classes:
                    raise DataError(f"Omniglot class {label!r} appears twice (second copy in {char.path})")
                imgs = []
                for f in os.scandir(char.path):
                    if f.is_file() and f.name.lower().endswith((".png", ".jpg", ".jpeg")):
                        st = f.stat()
                        rel = f"{sub}/{label}/{f.name}"
                        stats.append((rel, st.st_size, st.st_mtime_ns))
                        imgs.append((f.name, f.path))
                imgs.sort()
                classes[label] = imgs
        if len(classes) == before:
            raise DataError(f"incomplete Omniglot folder {root}: {top} holds no <Alphabet>/<characterNN>/ "
                            f"class folders.\n{LAYOUT}")
    labels = sorted(classes)
    files = [[p for _, p in classes[lab]] for lab in labels]  # plain str: Path() is slow here
    if images_per_class is not None:
        for lab, fl in zip(labels, files):
            if len(fl) != images_per_class:
                raise DataError(_missing_message(root, lab, fl, images_per_class))
    stats.sort()
    return labels, files, stats


def _missing_message(root: Path, label: str, files: list[str], expected: int) -> str:
    names = [os.path.basename(p) for p in files]
    if len(files) > expected:
        return (f"Omniglot class {label} has {len(files)} images, expected {expected}: "
                f"{list(files)}")
    folder = Path(files[0]).parent if files else None
    ids = {n.split("_")[0] for n in names if "_" in n}
    missing: list[str] = []
    if len(ids) == 1:
        cid = ids.pop()
        present = set(names)
        missing = [f"{cid}_{r:02d}.png" for r in range(1, expected + 1) if f"{cid}_{r:02d}.png" not in present]
    if folder is not None and missing:
        listed = ", ".join(str(folder / m) for m in missing)
        return f"missing Omniglot image(s): {listed} (class {label} has {len(files)} of {expected})"
    return (f"Omniglot class {label} has {len(files)} images, expected {expected} "
            f"(folder {folder if folder is not None else root})")


# ----------------------------------------------------------------------------------------------
# Decoding

def _load_class(args) -> np.ndarray:
    """Decode one class's images to uint8 [n, 1, H, W] (top level: runs in worker processes)."""
    from PIL import Image

    paths, height, width = args
    out = np.empty((len(paths), 1, height, width), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                # official: image.resize((h, w), resample=LANCZOS); Pillow forces NEAREST for mode "1"
                r = im.resize((width, height), resample=Image.LANCZOS)
                a = np.asarray(r)
        except Exception as exc:
            raise DataError(f"cannot read Omniglot image {p}: {type(exc).__name__}: {exc}") from None
        if a.ndim != 2:
            raise DataError(f"Omniglot image {p} is not single-channel (mode {r.mode!r})")
        out[i, 0] = a  # bool (mode "1") -> 0/1; mode "L" keeps 0..255 like np.float32 would
    return out


def _decode_all(files: Sequence[Sequence[str]], height: int, width: int, workers: Optional[int]) -> np.ndarray:
    n_img = max(len(f) for f in files)
    storage = np.zeros((len(files), n_img, 1, height, width), dtype=np.uint8)
    jobs = [([str(p) for p in fl], height, width) for fl in files]
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    total = sum(len(f) for f in files)
    use_pool = workers > 1 and total >= 2000 and "fork" in mp.get_all_start_methods()
    if use_pool:
        # fork: workers need only PIL/numpy, and spawn would re-import the whole package
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
            results = ex.map(_load_class, jobs, chunksize=16)
            for i, arr in enumerate(results):
                storage[i, : len(arr)] = arr
    else:
        for i, job in enumerate(jobs):
            arr = _load_class(job)
            storage[i, : len(arr)] = arr
    return storage


# ----------------------------------------------------------------------------------------------
# Download (only when the folder is missing and the network is reachable)

def network_reachable(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_omniglot(dest: Path) -> Path:
    """Download and unpack the two official zips into ``dest`` (md5-verified)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for sub, (url, md5) in OFFICIAL_ZIPS.items():
        if (dest / sub).is_dir():
            continue
        fd, tmp = tempfile.mkstemp(dir=dest, suffix=".zip.tmp")
        os.close(fd)
        try:
            urllib.request.urlretrieve(url, tmp)
            got = _md5(Path(tmp))
            if got != md5:
                raise DataError(f"downloaded {url} has md5 {got}, expected {md5}")
            # unpack beside dest, then rename: an interrupted unpack leaves no partial subfolder
            staging = Path(tempfile.mkdtemp(dir=dest, prefix=f".{sub}.", suffix=".tmp"))
            try:
                with zipfile.ZipFile(tmp) as z:
                    z.extractall(staging)
                if not (staging / sub).is_dir():
                    raise DataError(f"downloaded {url} does not hold a top-level {sub}/ folder")
                os.replace(staging / sub, dest / sub)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def _default_download_dir(root) -> Path:
    if root is not None:
        # A data folder gets the documented <dir>/omniglot; a folder already named for it, itself.
        root = Path(root).expanduser()
        return root if root.name in FOLDER_NAMES else root / "omniglot"
    env = os.environ.get("MAMLPP_FAST_DATA_DIR")
    if env:
        return Path(env).expanduser() / "omniglot"
    env = os.environ.get("DATASET_DIR")
    if env:
        return Path(env).expanduser() / "omniglot_dataset"
    return cache_dir() / "data" / "omniglot"


def resolve_omniglot_root(root=None, download: bool = True) -> Path:
    """Find the Omniglot folder, downloading it if absent and possible, else a clear error.

    The first candidate folder holding ``images_background`` or ``images_evaluation`` is the
    one; if it lacks the other, :class:`DataError` names the missing folder (no download into a
    half-present folder, and no silent fallback to another copy).
    """
    found = find_dataset_dir(root, FOLDER_NAMES, _has_omniglot_subfolder)
    if found is None and root is None:
        default = cache_dir() / "data" / "omniglot"
        if default.is_dir() and _has_omniglot_subfolder(default):
            found = default
    if found is not None:
        own_folder = root is None and found == cache_dir() / "data" / "omniglot"
        if own_folder and download and not all((found / s).is_dir() for s in SUBFOLDERS) and network_reachable():
            # The package's own download folder, half-filled by an interrupted download: finish
            # it (download_omniglot fetches only the missing zips). A user's folder is never
            # topped up behind their back.
            return download_omniglot(found)
        _require_both_subfolders(found)
        return found
    if download and network_reachable():
        return download_omniglot(_default_download_dir(root))
    raise DataNotFoundError(f"Omniglot not found and it cannot be downloaded (no network or "
                            f"download=False).\n{describe_search(root, FOLDER_NAMES)}\n{LAYOUT}")


# ----------------------------------------------------------------------------------------------
# Official image order (optional)

def apply_image_order(storage: np.ndarray, labels: Sequence[str], files: Sequence[Sequence[str]],
                      order_json: os.PathLike | str) -> np.ndarray:
    """Reorder images inside each class as listed in the official ``omniglot_dataset.json``."""
    with open(order_json) as f:
        listed = json.load(f)
    by_label: dict[str, list[str]] = {}
    for paths in listed.values():
        for p in paths:
            bits = p.replace("\\", "/").split("/")
            by_label.setdefault(f"{bits[-3]}/{bits[-2]}", []).append(bits[-1])
    out = storage.copy()
    for i, (lab, fl) in enumerate(zip(labels, files)):
        if lab not in by_label:
            raise DataError(f"class {lab} is not listed in {order_json}")
        pos = {os.path.basename(p): j for j, p in enumerate(fl)}
        for j, name in enumerate(by_label[lab]):
            if name not in pos:
                folder = Path(fl[0]).parent if fl else lab
                raise DataError(f"missing Omniglot image {Path(folder) / name} (listed in {order_json})")
            out[i, j] = storage[i, pos[name]]
    return out


# ----------------------------------------------------------------------------------------------
# Entry point

def _official_class_ids(labels: Sequence[str], class_folders: Sequence[int]) -> np.ndarray:
    """Our class index (``labels`` are "Alphabet/characterNN", sorted) of each official class
    index: the official code numbers the classes in sorted order of the label it joins from the
    ``class_folders`` path parts (-3: alphabet, -2: character)."""
    folders = tuple(int(i) for i in class_folders)
    if folders not in OMNIGLOT_CLASS_FOLDERS:
        raise DataConfigError(
            f"indexes_of_folders_indicating_class must be [-3, -2] (alphabet/character, as released) or "
            f"[-2, -3] (the official argparse default) for Omniglot, got {list(class_folders)!r}"
        )
    parts = [label.split("/") for label in labels]
    joined = ["/".join(p[1 if i == -2 else 0] for i in folders) for p in parts]
    return np.asarray(sorted(range(len(labels)), key=joined.__getitem__), dtype=np.int64)


def load_omniglot(root=None, *, image_size=(28, 28), val_seed: int = 0,
                  split_fractions: Sequence[float] = OMNIGLOT_SPLIT_FRACTIONS, use_cache: bool = True,
                  cache_folder: Optional[os.PathLike | str] = None, image_order: Optional[os.PathLike | str] = None,
                  workers: Optional[int] = None, download: bool = True,
                  images_per_class: Optional[int] = 20, class_folders: Sequence[int] = (-3, -2),
                  verbose: bool = False) -> FewShotDataset:
    """Load Omniglot into memory and split it the official way.

    ``image_size`` is (height, width). The decoded pixels are cached (see :mod:`.cache`); the
    split and ``image_order`` are applied after loading, so they do not affect the cache.

    Both ``images_background`` and ``images_evaluation`` must be present (:class:`DataError`
    otherwise). If the classes found are not the official 1623 x 20 images, one
    :class:`UnofficialDataWarning` says so (the split then differs from the official one).
    ``FewShotDataset.describe()`` gives a one-line summary of what was loaded.

    ``class_folders`` plays the official ``indexes_of_folders_indicating_class``: which path
    parts name a class, in the order they are joined into the label whose sorted order the split
    shuffles: (-3, -2) ("Alphabet/characterNN") or (-2, -3) (the same classes, another split).
    The official code builds its class lists from the key, except for dataset_name
    'omniglot_dataset', whose lists it ships (built with (-3, -2)); `MetaLearningDataLoader`
    passes the key accordingly.
    """
    height, width = (int(image_size), int(image_size)) if np.isscalar(image_size) else map(int, image_size)
    if len(split_fractions) != 3:
        raise DataConfigError(f"split_fractions (train_val_test_split) must have 3 entries, "
                              f"got {split_fractions!r}")
    t0 = time.perf_counter()
    folder = resolve_omniglot_root(root, download=download)
    labels, files, stats = scan_omniglot(folder, images_per_class=images_per_class)
    params = {"kind": "omniglot", "version": PREPROCESS_VERSION, "height": height, "width": width,
              "resample": "LANCZOS"}
    fp = _cache.fingerprint(stats, params)
    entry = _cache.entry_path(Path(cache_folder) if cache_folder is not None else cache_dir(), "omniglot", fp)
    storage = None
    hit = False
    if use_cache:
        got = _cache.load(entry)
        if got is not None and list(got.get("labels", [])) == labels:
            storage = got["storage"]
            hit = True
    if storage is None:
        storage = _decode_all(files, height, width, workers)
        if use_cache:
            _cache.save(entry, {"storage": storage, "labels": np.asarray(labels)})
    counts = np.asarray([len(f) for f in files], dtype=np.int64)
    if image_order is not None:
        storage = apply_image_order(storage, labels, files, image_order)

    total = len(labels)
    order = np.arange(total, dtype=np.int32)
    np.random.RandomState(seed=official_seed(val_seed)).shuffle(order)
    order = _official_class_ids(labels, class_folders)[order]
    a, b, c = split_counts(total, split_fractions)
    order = order.astype(np.int64)
    splits = {}
    for name, ids in (("train", order[:a]), ("val", order[a:b]), ("test", order[b:c])):
        splits[name] = SplitData(storage=storage, class_ids=ids, counts=counts[ids],
                                 class_names=tuple(labels[i] for i in ids))
    oa, ob, oc = split_counts(OFFICIAL_NUM_CLASSES, OMNIGLOT_SPLIT_FRACTIONS)
    official = (f"{OFFICIAL_NUM_CLASSES} classes (train {oa} / val {ob - oa} / test {oc - ob}) "
                f"x {OFFICIAL_IMAGES_PER_CLASS} images")
    is_official = total == OFFICIAL_NUM_CLASSES and bool(np.all(counts == OFFICIAL_IMAGES_PER_CLASS))
    if not is_official:
        warnings.warn(
            f"omniglot at {folder}: found {total} classes x {count_text(counts)} images, but the official "
            f"Omniglot has {official}. The split is drawn from the classes found (train {a} / val {b - a} "
            f"/ test {c - b}), so the tasks, and comparisons with the paper's results, differ.",
            UnofficialDataWarning, stacklevel=2)
    elapsed = time.perf_counter() - t0
    ds = FewShotDataset(name="omniglot", splits=splits, lut=identity_lut(1), rotation_augment=True,
                        info={"root": str(folder), "cache_file": str(entry), "cache_hit": hit,
                              "use_cache": bool(use_cache), "load_seconds": elapsed, "labels": tuple(labels),
                              "official": official, "is_official": is_official})
    if verbose:
        print(ds.describe())
    return ds
