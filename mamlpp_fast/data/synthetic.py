"""SyntheticGlyphs: procedural few-shot classes that need no download.

Each class is a glyph made of a few random strokes (straight segments and quadratic curves) in
the unit square. Each image of the class redraws the glyph with its own small affine transform
(rotation, scale, shear, shift), per-point wobble, stroke width and pixel noise, anti-aliased.
Like Omniglot the background is 1 and the ink 0 (single channel); with 3 channels each class also
gets an ink colour and each image a slightly varying paper colour.

Everything is a function of ``seed`` and the class's (split, index), so the same arguments always
give the same pixels, and adding classes to one split does not change the others.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import cache as _cache
from .paths import cache_dir
from .sampler import FewShotDataset, SplitData

RENDER_VERSION = 1

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def _strokes_for_glyph(rng: np.random.Generator, min_strokes: int, max_strokes: int) -> list[np.ndarray]:
    """The strokes of one glyph, each a polyline [n, 2] of (x, y) in the unit square."""
    strokes = []
    for _ in range(int(rng.integers(min_strokes, max_strokes + 1))):
        p0, p2 = rng.uniform(0.15, 0.85, size=(2, 2))
        while np.hypot(*(p2 - p0)) < 0.3:  # no tiny strokes
            p2 = rng.uniform(0.15, 0.85, size=2)
        if rng.random() < 0.5:  # straight stroke
            strokes.append(np.stack([p0, p2]))
        else:  # quadratic curve, sampled as 6 segments
            p1 = rng.uniform(0.1, 0.9, size=2)
            t = np.linspace(0.0, 1.0, 7)[:, None]
            strokes.append((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2)
    return strokes


def _render(strokes: list[np.ndarray], height: int, width: int, thickness: float) -> np.ndarray:
    """Ink coverage [H, W] in [0, 1]: PIL lines drawn supersampled, then box-filtered down."""
    from PIL import Image, ImageDraw

    f = 4 if max(height, width) <= 32 else 2
    big_w, big_h = width * f, height * f
    canvas = Image.new("L", (big_w, big_h), 0)
    draw = ImageDraw.Draw(canvas)
    line_w = max(1, int(round(thickness * min(big_w, big_h))))
    scale = np.array([big_w, big_h], dtype=np.float64)
    for pts in strokes:
        xy = [tuple(p) for p in (pts * scale).tolist()]
        draw.line(xy, fill=255, width=line_w, joint="curve")
    small = canvas.resize((width, height), resample=Image.BOX)
    return np.asarray(small, dtype=np.float32) / np.float32(255.0)


@dataclass
class SyntheticGlyphs:
    """Configuration of the synthetic data set; :meth:`build` makes the :class:`FewShotDataset`."""

    num_train_classes: int = 400
    num_val_classes: int = 50
    num_test_classes: int = 100
    images_per_class: int = 20
    image_shape: Sequence[int] = (1, 28, 28)
    seed: int = 0
    min_strokes: int = 2
    max_strokes: int = 4
    rotation_deg: float = 12.0
    scale_jitter: float = 0.10
    shear: float = 0.10
    shift: float = 0.06
    wobble: float = 0.02
    noise: float = 0.06
    rotate_training_tasks: bool = False  # Omniglot-style 90-degree class rotations in training

    def _check(self) -> tuple[int, int, int]:
        if len(self.image_shape) != 3 or int(self.image_shape[0]) not in (1, 3):
            raise ValueError(f"image_shape must be (C, H, W) with C in (1, 3), got {tuple(self.image_shape)}")
        c, h, w = (int(v) for v in self.image_shape)
        if h < 8 or w < 8:
            raise ValueError(f"image_shape height and width must be >= 8, got {h}x{w}")
        for name in ("num_train_classes", "num_val_classes", "num_test_classes", "images_per_class"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 1 <= self.min_strokes <= self.max_strokes:
            raise ValueError(f"need 1 <= min_strokes <= max_strokes, got {self.min_strokes}, {self.max_strokes}")
        return c, h, w

    def render_class(self, split: str, index: int) -> np.ndarray:
        """uint8 [images_per_class, C, H, W] for class ``index`` of ``split``."""
        c, h, w = self._check()
        rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), _SPLIT_IDS[split], int(index)]))
        base = _strokes_for_glyph(rng, self.min_strokes, self.max_strokes)
        ink_color = rng.uniform(0.0, 0.45, size=c) if c == 3 else np.zeros(1)
        s = int(self.images_per_class)
        ink = np.empty((s, h, w), dtype=np.float32)
        for i in range(s):
            ang = np.deg2rad(rng.normal(0.0, self.rotation_deg))
            cos, sin = np.cos(ang), np.sin(ang)
            mat = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, rng.uniform(-self.shear, self.shear)],
                                                                  [0.0, 1.0]])
            mat = mat * (1.0 + rng.uniform(-self.scale_jitter, self.scale_jitter, size=(1, 2)))
            shift = 0.5 + rng.uniform(-self.shift, self.shift, size=2)
            moved = [(p - 0.5) @ mat.T + shift + rng.normal(0.0, self.wobble, size=p.shape) for p in base]
            ink[i] = _render(moved, h, w, rng.uniform(0.035, 0.06))
        paper = 1.0 - rng.uniform(0.0, 0.08, size=(s, 1, 1, 1)) if c == 3 else np.ones((s, 1, 1, 1))
        img = paper * (1.0 - ink[:, None]) + ink_color.reshape(1, -1, 1, 1) * ink[:, None]
        img = img + rng.normal(0.0, self.noise, size=img.shape)
        return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    def build(self, use_cache: bool = True, cache_folder=None, workers: Optional[int] = None) -> FewShotDataset:
        """Render every class (or load them from the on-disk cache) into a :class:`FewShotDataset`."""
        c, h, w = self._check()
        sizes = {"train": int(self.num_train_classes), "val": int(self.num_val_classes),
                 "test": int(self.num_test_classes)}
        params = {"kind": "synthetic_glyphs", "version": RENDER_VERSION, **{
            k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in asdict(self).items()}}
        entry = _cache.entry_path(Path(cache_folder) if cache_folder is not None else cache_dir(),
                                  "synthetic", _cache.fingerprint([], params))
        got = _cache.load(entry) if use_cache else None
        hit = got is not None
        if got is None:
            jobs = [(self, split, i) for split, n in sizes.items() for i in range(n)]
            if workers is None:
                workers = min(4, os.cpu_count() or 1)
            if workers > 1 and len(jobs) >= 64 and "fork" in mp.get_all_start_methods():
                with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as ex:
                    rendered = list(ex.map(_render_job, jobs, chunksize=16))
            else:
                rendered = [_render_job(j) for j in jobs]
            got, start = {}, 0
            for split, n in sizes.items():
                got[split] = np.stack(rendered[start:start + n])
                start += n
            if use_cache:
                _cache.save(entry, got)
        splits = {}
        for split, n in sizes.items():
            splits[split] = SplitData(storage=got[split], class_ids=np.arange(n, dtype=np.int64),
                                      counts=np.full(n, int(self.images_per_class), dtype=np.int64),
                                      class_names=tuple(f"{split}/glyph{i:04d}" for i in range(n)))
        lut = np.tile(np.arange(256, dtype=np.float32) / np.float32(255.0), (c, 1))
        return FewShotDataset(name="synthetic_glyphs", splits=splits, lut=lut,
                              rotation_augment=bool(self.rotate_training_tasks),
                              info={"config": self, "cache_file": str(entry), "cache_hit": hit,
                                    "use_cache": bool(use_cache), "source": f"generated, seed {self.seed}"})


def _render_job(job) -> np.ndarray:
    glyphs, split, index = job
    return glyphs.render_class(split, index)
