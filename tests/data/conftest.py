"""Fixtures for the data tests. All image fixtures are generated here at test time."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
REAL_OMNIGLOT = Path(os.environ.get("MAMLPP_FAST_OMNIGLOT", REPO.parent / "shared" / "data" / "omniglot"))


# ----------------------------------------------------------------------------------------------
# Generators

def write_omniglot_png(path: Path, rng: np.random.Generator, size: int = 105) -> None:
    """A 1-bit PNG like Omniglot's: white (1) background, a few black rectangles of ink."""
    from PIL import Image

    a = np.ones((size, size), dtype=bool)
    for _ in range(3):
        y, x = rng.integers(5, size - 30, size=2)
        h, w = rng.integers(8, 25, size=2)
        a[y:y + h, x:x + w] = False
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).convert("1").save(path)


def make_omniglot_tree(root: Path, n_background=(("Alpha", 10), ("Beta_(x)", 12)),
                       n_evaluation=(("Angelic", 10), ("Zeta", 8)), images: int = 20, seed: int = 0) -> Path:
    """Official layout, official file naming <ID>_<RR>.png, tiny alphabets."""
    rng = np.random.default_rng(seed)
    cid = 1
    for sub, alphabets in (("images_background", n_background), ("images_evaluation", n_evaluation)):
        for alpha, n_chars in alphabets:
            for c in range(1, n_chars + 1):
                for r in range(1, images + 1):
                    write_omniglot_png(root / sub / alpha / f"character{c:02d}" / f"{cid:04d}_{r:02d}.png", rng)
                cid += 1
    return root


def make_mini_imagenet_folders(root: Path, classes=(("train", 3), ("val", 2), ("test", 2)),
                               images: int = 6, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    wn = 1000
    for split, n in classes:
        for _ in range(n):
            wn += 7
            d = root / split / f"n{wn:08d}"
            d.mkdir(parents=True)
            for i in range(images):
                h, w = int(rng.integers(60, 120)), int(rng.integers(60, 120))
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                im = Image.fromarray(arr)
                if i == 0:
                    im = im.convert("L")  # a grayscale JPEG: convert('RGB') must handle it
                im.save(d / f"n{wn:08d}{i:08d}.jpg", quality=90)
    return root


def make_mini_imagenet_pickles(root: Path, classes=(("train", 3), ("val", 2), ("test", 2)),
                               images: int = 5, seed: int = 0, size: int = 84) -> Path:
    """Pickle layout; ``size`` < 84 makes full-count fixtures (64/16/20 x 600) cheap."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    wn = 5000
    for split, n in classes:
        data = rng.integers(0, 256, size=(n * images, size, size, 3), dtype=np.uint8)
        order = rng.permutation(n * images)
        class_dict = {}
        for c in range(n):
            wn -= 3  # decreasing: the loader must sort
            class_dict[f"n{wn:08d}"] = [int(i) for i in order[c * images:(c + 1) * images]]
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    return root


# ----------------------------------------------------------------------------------------------
# pytest fixtures

@pytest.fixture
def cache_tmp(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MAMLPP_FAST_CACHE_DIR", str(d))
    return d


@pytest.fixture
def fixture_makers():
    """The generator functions (tests cannot import conftest under --import-mode=importlib)."""
    return {"omniglot": make_omniglot_tree, "omniglot_png": write_omniglot_png,
            "mini_folders": make_mini_imagenet_folders, "mini_pickles": make_mini_imagenet_pickles}


@pytest.fixture
def omniglot_tree(tmp_path):
    return make_omniglot_tree(tmp_path / "omniglot")


@pytest.fixture(scope="session")
def real_omniglot_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def real_omniglot(real_omniglot_cache):
    """The real Omniglot, loaded once per session into a session-private cache."""
    if not (REAL_OMNIGLOT / "images_background").is_dir():
        pytest.skip(f"real Omniglot not found at {REAL_OMNIGLOT} (set MAMLPP_FAST_OMNIGLOT)")
    from mamlpp_fast.data.omniglot import load_omniglot

    ds = load_omniglot(REAL_OMNIGLOT, cache_folder=real_omniglot_cache, download=False)
    print(f"\n[data] real Omniglot first load: {ds.info['load_seconds']:.2f}s (cache hit: {ds.info['cache_hit']})")
    return ds
