"""In-memory few-shot data sets, the official task sampler, and background prefetch.

Every data set is held as uint8 pixels, ``storage[class_row, image, C, H, W]``, plus a per-channel
256-entry float32 look-up table that maps a stored byte to the network input value (for Omniglot
the identity, for mini-ImageNet ``(v/255 - mean)/std`` computed in float32 as the official
``ToTensor``/``Normalize`` does). A task is then one vectorised gather plus one table look-up;
the only per-task Python work is the seeded ``RandomState`` draws, made in the official order:

    rng = RandomState(seed)
    classes = rng.choice(num_classes_in_split, N, replace=False); rng.shuffle(classes)
    rotations = rng.randint(0, 4, size=N)             # drawn always, applied in training only
    for each class, in label order: rng.choice(images_in_class, K + T, replace=False)

Seeds (official ``FewShotLearningDatasetParallel``): ``seed' = RandomState(seed).randint(1, 999999)``;
training task ``j`` of iteration ``it`` uses ``train_seed' + it * B + j``; validation and test task
``j`` both use ``val_seed' + j`` (the same seeds, different class splits).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def official_seed(seed: int) -> int:
    """The official seed derivation: ``RandomState(seed).randint(1, 999999)``."""
    return int(np.random.RandomState(seed).randint(1, 999999))


def split_counts(total: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Class-count boundaries exactly as the official ``load_dataset`` computes them."""
    a = int(fractions[0] * total)
    b = int(np.sum(fractions[:2]) * total)
    return a, b, int(total)


def identity_lut(channels: int) -> np.ndarray:
    """Stored byte v -> float32(v) (Omniglot: pixels are used as-is, no /255)."""
    return np.tile(np.arange(256, dtype=np.float32), (channels, 1))


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Stored byte v -> (float32(v)/255 - mean)/std, every step in float32 like torchvision."""
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    rows = [(v - np.float32(m)) / np.float32(s) for m, s in zip(mean, std)]
    return np.stack(rows).astype(np.float32)


@dataclass
class SplitData:
    """One split: the classes it owns, as rows of a (possibly shared) uint8 storage array."""

    storage: np.ndarray      # uint8 [rows, max_images_per_class, C, H, W]
    class_ids: np.ndarray    # int64 [num_classes]: storage row of each class, in official order
    counts: np.ndarray       # int64 [num_classes]: images available for each class
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return int(len(self.class_ids))

    @property
    def num_images(self) -> int:
        return int(self.counts.sum())


@dataclass
class FewShotDataset:
    """A data set ready for episode sampling (see the module docstring for the layout)."""

    name: str
    splits: dict[str, SplitData]
    lut: np.ndarray                     # float32 [C, 256]
    rotation_augment: bool = False      # official: rotate classes of training tasks (Omniglot)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        any_split = next(iter(self.splits.values()))
        return tuple(int(s) for s in any_split.storage.shape[2:])  # type: ignore[return-value]

    def split(self, name: str) -> SplitData:
        if name not in self.splits:
            raise ValueError(f"split must be one of {sorted(self.splits)}, got {name!r}")
        return self.splits[name]

    def decode(self, u8: np.ndarray) -> np.ndarray:
        """uint8 [..., C, H, W] -> float32 network input via the per-channel table."""
        if self.lut.shape[0] == 1:
            return self.lut[0][u8]
        out = np.empty(u8.shape, dtype=np.float32)
        for c in range(self.lut.shape[0]):
            out[..., c, :, :] = self.lut[c][u8[..., c, :, :]]
        return out


class EpisodeBatch(NamedTuple):
    """A batch of B tasks, class-major, in the official tuple order."""

    x_support: Any   # float32 [B, N, K, C, H, W]
    x_target: Any    # float32 [B, N, T, C, H, W]
    y_support: Any   # int64 [B, N, K]
    y_target: Any    # int64 [B, N, T]
    seeds: Any       # int64 [B], the RandomState seed of each task

    def to_torch(self, device=None, pin_memory: bool = False, non_blocking: bool = True) -> "EpisodeBatch":
        return to_torch(self, device=device, pin_memory=pin_memory, non_blocking=non_blocking)


def to_torch(batch: EpisodeBatch, device=None, pin_memory: bool = False,
             non_blocking: bool = True) -> EpisodeBatch:
    """Numpy batch -> torch tensors (zero-copy on CPU; optionally pinned and/or moved)."""
    import torch

    out = []
    for a in batch:
        t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
        if pin_memory and torch.cuda.is_available():
            t = t.pin_memory()
        if device is not None:
            t = t.to(device, non_blocking=non_blocking)
        out.append(t)
    return EpisodeBatch(*out)


def draw_task(seed: int, counts: np.ndarray, n_way: int, n_samples: int):
    """The official per-task random draws. Returns (classes [N], rotations [N], images [N, S])."""
    rng = np.random.RandomState(seed)
    classes = rng.choice(len(counts), size=n_way, replace=False)
    rng.shuffle(classes)
    rotations = rng.randint(0, 4, size=n_way)
    images = np.empty((n_way, n_samples), dtype=np.int64)
    for i, c in enumerate(classes):
        images[i] = rng.choice(int(counts[c]), size=n_samples, replace=False)
    return classes.astype(np.int64), rotations.astype(np.int64), images


def build_batch(dataset: FewShotDataset, split: SplitData, seeds: Sequence[int], n_way: int,
                k_shot: int, n_target: int, augment: bool) -> EpisodeBatch:
    """Assemble B tasks with one gather. ``augment`` applies the per-class 90-degree rotations."""
    b = len(seeds)
    s = k_shot + n_target
    classes = np.empty((b, n_way), dtype=np.int64)
    rots = np.empty((b, n_way), dtype=np.int64)
    images = np.empty((b, n_way, s), dtype=np.int64)
    for i, seed in enumerate(seeds):
        classes[i], rots[i], images[i] = draw_task(int(seed), split.counts, n_way, s)
    rows = split.class_ids[classes]                       # [B, N]
    u8 = split.storage[rows[:, :, None], images]          # [B, N, S, C, H, W]
    if augment:
        for k in (1, 2, 3):
            m = rots == k
            if m.any():
                u8[m] = np.rot90(u8[m], k=k, axes=(-2, -1))
    x = dataset.decode(u8)
    labels = np.broadcast_to(np.arange(n_way, dtype=np.int64)[None, :, None], (b, n_way, s))
    return EpisodeBatch(
        x_support=np.ascontiguousarray(x[:, :, :k_shot]),
        x_target=np.ascontiguousarray(x[:, :, k_shot:]),
        y_support=np.ascontiguousarray(labels[:, :, :k_shot]),
        y_target=np.ascontiguousarray(labels[:, :, k_shot:]),
        seeds=np.asarray(seeds, dtype=np.int64),
    )


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class EpisodeSampler:
    """Deterministic stream of task batches from one split.

    Batch ``i`` (absolute iteration number) holds tasks with seeds ``base + i*B + j``, j < B,
    where ``base = RandomState(seed).randint(1, 999999)`` (``derive_seed=False`` uses ``seed``
    as-is). Iteration starts at ``start_iter`` so a resumed run continues the same stream.
    ``num_batches=None`` makes ``__iter__`` endless.

    ``augment=None`` means the official rule: rotate in training tasks of data sets that
    ask for it (Omniglot), never in validation or test tasks.
    """

    def __init__(self, dataset: FewShotDataset, split: str, n_way: int, k_shot: int, n_target: int,
                 batch_size: int, seed: int = 0, augment: Optional[bool] = None, start_iter: int = 0,
                 num_batches: Optional[int] = None, derive_seed: bool = True):
        self.dataset = dataset
        self.split_name = split
        self.split = dataset.split(split)
        self.n_way = _check_positive_int("n_way", n_way)
        self.k_shot = _check_positive_int("k_shot", k_shot)
        if isinstance(n_target, bool) or int(n_target) != n_target or int(n_target) < 0:
            raise ValueError(f"n_target must be a non-negative integer, got {n_target!r}")
        self.n_target = int(n_target)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if int(start_iter) != start_iter or start_iter < 0:
            raise ValueError(f"start_iter must be a non-negative integer, got {start_iter!r}")
        self.start_iter = int(start_iter)
        if num_batches is not None and (int(num_batches) != num_batches or num_batches < 0):
            raise ValueError(f"num_batches must be None or a non-negative integer, got {num_batches!r}")
        self.num_batches = None if num_batches is None else int(num_batches)
        if self.n_way > self.split.num_classes:
            raise ValueError(f"n_way={self.n_way} is greater than the {self.split.num_classes} classes "
                             f"of the {split!r} split of {dataset.name}")
        need = self.k_shot + self.n_target
        short = int(self.split.counts.min()) if len(self.split.counts) else 0
        if need > short:
            raise ValueError(f"k_shot + n_target = {self.k_shot} + {self.n_target} = {need} is greater than "
                             f"the images per class ({short}, the smallest class) of the {split!r} split "
                             f"of {dataset.name}")
        self.seed = int(seed)
        self.base_seed = official_seed(self.seed) if derive_seed else self.seed
        if augment is None:
            augment = dataset.rotation_augment and split == "train"
        self.augment = bool(augment)
        if self.augment:
            c, h, w = dataset.image_shape
            if h != w:
                raise ValueError(f"augment=True needs square images for 90-degree rotations, got {h}x{w}")

    def task_seeds(self, index: int) -> np.ndarray:
        """Seeds of the B tasks of absolute batch ``index``."""
        return self.base_seed + index * self.batch_size + np.arange(self.batch_size, dtype=np.int64)

    def batch(self, index: int) -> EpisodeBatch:
        """Absolute batch ``index`` (random access, deterministic)."""
        return build_batch(self.dataset, self.split, self.task_seeds(index), self.n_way,
                           self.k_shot, self.n_target, self.augment)

    def batches(self, num_batches: Optional[int] = None, start: Optional[int] = None) -> Iterator[EpisodeBatch]:
        """``num_batches`` batches (None: endless) starting at absolute batch ``start``."""
        i = self.start_iter if start is None else int(start)
        stop = None if num_batches is None else i + int(num_batches)
        while stop is None or i < stop:
            yield self.batch(i)
            i += 1

    def __iter__(self) -> Iterator[EpisodeBatch]:
        return self.batches(self.num_batches)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this sampler is endless (num_batches=None)")
        return self.num_batches

    def prefetch(self, num_batches: Optional[int] = None, depth: int = 3,
                 transform: Optional[Callable[[EpisodeBatch], Any]] = None,
                 start: Optional[int] = None) -> "Prefetcher":
        """Like :meth:`batches` but built ``depth`` batches ahead in a background thread."""
        n = self.num_batches if num_batches is None else num_batches
        return Prefetcher(self.batches(n, start=start), depth=depth, transform=transform)


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher:
    """Run an iterator in a daemon thread, ``depth`` items ahead, through a bounded queue.

    Exceptions raised by the producer (or by ``transform``) are re-raised in the consumer at the
    position where they happened. ``close()`` (also on ``with`` exit, garbage collection, or
    after the last item) stops and joins the thread.
    """

    def __init__(self, iterable: Iterable, depth: int = 3, transform: Optional[Callable] = None):
        if int(depth) < 1:
            raise ValueError(f"depth must be >= 1, got {depth!r}")
        self._source = iter(iterable)
        self._transform = transform
        self._queue: queue.Queue = queue.Queue(maxsize=int(depth))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="mamlpp-fast-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set():
                    return
                if self._transform is not None:
                    item = self._transform(item)
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer
            self._put(_Failure(exc))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# Construction from names and official-style configs.

def make_dataset(name: str, root=None, **kwargs) -> FewShotDataset:
    """Build a data set by name.

    ``name`` follows the official ``dataset_name`` convention: anything containing ``omniglot``
    is Omniglot, anything containing ``imagenet`` is mini-ImageNet, and ``synthetic`` (or
    ``synthetic_glyphs``) is the built-in procedural data set. ``kwargs`` go to the loader.
    """
    key = name.lower()
    if "synthetic" in key:
        from .synthetic import SyntheticGlyphs
        return SyntheticGlyphs(**kwargs).build()
    if "omniglot" in key:
        from .omniglot import load_omniglot
        return load_omniglot(root, **kwargs)
    if "imagenet" in key:
        from .mini_imagenet import load_mini_imagenet
        return load_mini_imagenet(root, **kwargs)
    raise ValueError(f"dataset_name {name!r} is not known: use one containing 'omniglot', "
                     f"'imagenet' or 'synthetic'")


_CONFIG_KEYS = ("dataset_name", "dataset_path", "num_classes_per_set", "num_samples_per_class",
                "num_target_samples", "batch_size", "train_seed", "val_seed", "num_evaluation_tasks",
                "image_height", "image_width", "image_channels", "num_of_gpus", "samples_per_iter",
                "train_val_test_split")

_DEFAULTS = dict(dataset_name="synthetic", dataset_path=None, num_classes_per_set=5,
                 num_samples_per_class=1, num_target_samples=1, batch_size=8, train_seed=0, val_seed=0,
                 num_evaluation_tasks=600, image_height=28, image_width=28, image_channels=1,
                 num_of_gpus=1, samples_per_iter=1, train_val_test_split=None)


class MetaLearningDataLoader:
    """Drop-in for the official ``MetaLearningSystemDataLoader``, keyed by the official names.

    Values come from ``config`` (any object with those attributes, e.g. a ``MAMLConfig``), then
    keyword overrides, then defaults. Batches are :class:`EpisodeBatch` of numpy arrays (or what
    ``transform`` makes of them), ``B = num_of_gpus * batch_size * samples_per_iter`` tasks each.
    """

    def __init__(self, config: Any = None, current_iter: int = 0, dataset: Optional[FewShotDataset] = None,
                 prefetch: int = 3, transform: Optional[Callable] = None, **overrides):
        values = dict(_DEFAULTS)
        for k in _CONFIG_KEYS:
            if config is not None and hasattr(config, k):
                values[k] = getattr(config, k)
        unknown = set(overrides) - set(_CONFIG_KEYS) - {"dataset_kwargs"}
        if unknown:
            raise ValueError(f"unknown argument(s) {sorted(unknown)}; known: {list(_CONFIG_KEYS)}")
        dataset_kwargs = dict(overrides.pop("dataset_kwargs", {}) or {})
        values.update(overrides)
        self.args = values
        for k, v in values.items():
            setattr(self, k, v)
        self.total_batch_size = int(values["num_of_gpus"]) * int(values["batch_size"]) * int(values["samples_per_iter"])
        if dataset is None:
            name = str(values["dataset_name"])
            if "omniglot" in name.lower() or "imagenet" in name.lower():
                dataset_kwargs.setdefault("image_size", (int(values["image_height"]), int(values["image_width"])))
                if "omniglot" in name.lower():
                    dataset_kwargs.setdefault("val_seed", int(values["val_seed"]))
                    if values["train_val_test_split"] is not None:
                        dataset_kwargs.setdefault("split_fractions", tuple(values["train_val_test_split"]))
            elif "synthetic" in name.lower():
                dataset_kwargs.setdefault("image_shape", (int(values["image_channels"]), int(values["image_height"]),
                                                          int(values["image_width"])))
            dataset = make_dataset(name, values["dataset_path"], **dataset_kwargs)
        self.dataset = dataset
        c = dataset.image_shape[0]
        if int(values["image_channels"]) != c:
            raise ValueError(f"image_channels={values['image_channels']} but {dataset.name} has {c} channel(s)")
        self.prefetch_depth = int(prefetch)
        self.transform = transform
        self.current_iter = int(current_iter)
        self._samplers = {
            split: EpisodeSampler(dataset, split, int(values["num_classes_per_set"]),
                                  int(values["num_samples_per_class"]), int(values["num_target_samples"]),
                                  self.total_batch_size,
                                  seed=int(values["train_seed"] if split == "train" else values["val_seed"]))
            for split in SPLITS if split in dataset.splits
        }

    def sampler(self, split: str) -> EpisodeSampler:
        return self._samplers[split]

    def _iterate(self, sampler: EpisodeSampler, num_batches: int, start: int,
                 augment_images: Optional[bool]) -> Iterator:
        if augment_images is not None and bool(augment_images) != sampler.augment:
            sampler = EpisodeSampler(self.dataset, sampler.split_name, sampler.n_way, sampler.k_shot,
                                     sampler.n_target, sampler.batch_size, seed=sampler.seed,
                                     augment=bool(augment_images))
        if self.prefetch_depth > 0:
            return sampler.prefetch(num_batches, depth=self.prefetch_depth, transform=self.transform, start=start)
        gen = sampler.batches(num_batches, start=start)
        return gen if self.transform is None else map(self.transform, gen)

    def _full_length(self, split: str) -> int:
        # official total_batches=-1: as many tasks as the split has images
        return self._samplers[split].split.num_images // self.total_batch_size

    def get_train_batches(self, total_batches: int = -1, current_iter: Optional[int] = None,
                          augment_images: Optional[bool] = None) -> Iterator:
        """Training batches from iteration ``current_iter`` (default: where the last call stopped).

        ``augment_images=None`` is the official rule (rotate Omniglot training tasks).
        """
        if current_iter is not None:
            self.current_iter = int(current_iter)
        n = self._full_length("train") if total_batches == -1 else int(total_batches)
        start = self.current_iter
        self.current_iter += n
        return self._iterate(self._samplers["train"], n, start, augment_images)

    def get_val_batches(self, total_batches: Optional[int] = None, augment_images: bool = False) -> Iterator:
        """The fixed validation tasks: ``int(num_evaluation_tasks / B)`` batches by default."""
        n = self._eval_batches(total_batches, "val")
        return self._iterate(self._samplers["val"], n, 0, augment_images)

    def get_test_batches(self, total_batches: Optional[int] = None, augment_images: bool = False) -> Iterator:
        """The fixed test tasks (same seeds as validation, test classes)."""
        n = self._eval_batches(total_batches, "test")
        return self._iterate(self._samplers["test"], n, 0, augment_images)

    def _eval_batches(self, total_batches: Optional[int], split: str) -> int:
        if total_batches is None:
            return int(int(self.num_evaluation_tasks) / self.total_batch_size)
        if total_batches == -1:
            return self._full_length(split)
        return int(total_batches)
