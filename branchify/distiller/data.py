"""Datasets and loaders from local files only: nothing here ever downloads (the readers are in
``branchify.distiller.datasets``).

Three sources, picked by ``load_dataset``:

- ``"digits"``: scikit-learn's bundled handwritten digits (1797 grey 8x8 images, 10 classes), the
  offline default. Upscaled, replicated to 3 channels, split 60/20/20 (train/val/test) per class.
- a CIFAR-10 *python* folder (``data_batch_1`` ... ``data_batch_5``, ``test_batch``,
  ``batches.meta``), or the folder that holds ``cifar-10-batches-py``. ``val`` is carved out of the
  training batches; ``test`` is ``test_batch``.
- an ImageFolder tree (one subfolder of images per class): either ``root/train`` plus ``root/val``
  (or ``root/test``), where ``val`` is carved out of ``train`` and the second tree is ``test``, or a
  single tree from which ``val`` and ``test`` are both carved.

Carved splits are stratified (each class keeps its share) and depend only on ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import BranchifyError
from . import datasets
from .datasets import (
    _EXPECTED,
    CIFAR10_MEAN,  # noqa: F401 (re-exported)
    CIFAR10_STD,  # noqa: F401 (re-exported)
    IMAGENET_MEAN,  # noqa: F401 (re-exported)
    IMAGENET_STD,  # noqa: F401 (re-exported)
    SPLITS,
    ImageSize,
    LabelledSubset,
    TensorImages,  # noqa: F401 (re-exported)
    _check_fraction,
    _check_split,
    _cifar_folder,
    _cifar_transform,
    _image_folder,
    _imagefolder_roots,
    _imagefolder_transform,
    _stratified_split,
    cifar10_dataset,
    digits_dataset,
    imagefolder_dataset,  # noqa: F401 (re-exported)
)

# The readers are re-exported: ``from branchify.distiller.data import digits_dataset`` keeps working.
__all__ = [*datasets.__all__, "Loaders", "load_dataset", "load_splits", "make_loaders"]


class Loaders(NamedTuple):
    """The train, val and test ``DataLoader`` of one dataset."""

    train: DataLoader
    val: DataLoader
    test: DataLoader

    @property
    def classes(self) -> list[str]:
        """The class names, index = label."""
        return list(self.train.dataset.classes)  # type: ignore[attr-defined]

    @property
    def num_classes(self) -> int:
        """How many classes the dataset has."""
        return len(self.classes)


def _kind(spec: str | Path) -> tuple[str, Path | None]:
    if isinstance(spec, str) and spec.strip().lower() == "digits":
        return "digits", None
    if not isinstance(spec, (str, Path)):
        raise BranchifyError(f"dataset must be 'digits' or a path, got {type(spec).__name__} {spec!r}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise BranchifyError(f"dataset path {path} does not exist; give {_EXPECTED}")
    if not path.is_dir():
        raise BranchifyError(f"dataset path {path} is a file, not a folder; give {_EXPECTED}")
    if _cifar_folder(path) is not None:
        return "cifar10", path
    if any(child.is_dir() for child in path.iterdir()):
        return "imagefolder", path
    found = sorted(child.name for child in path.iterdir())[:8]
    raise BranchifyError(
        f"dataset path {path} holds {found or 'nothing'}, which fits no known layout; give {_EXPECTED}")


def load_splits(spec: str | Path, *, size: ImageSize | None = None, augment: bool = False, seed: int = 0,
                val_fraction: float = 0.1) -> dict[str, Dataset]:
    """The ``train``, ``val`` and ``test`` datasets of ``spec`` (see ``load_dataset``).

    >>> from branchify.distiller.data import load_splits
    >>> {name: len(ds) for name, ds in load_splits("digits").items()}
    {'train': 1079, 'val': 359, 'test': 359}
    """
    _check_fraction(val_fraction)
    kind, path = _kind(spec)
    if kind == "digits":
        return {split: digits_dataset(split, 32 if size is None else size, seed) for split in SPLITS}
    assert path is not None
    if kind == "cifar10":
        full = cifar10_dataset(path, train=True)
        test = cifar10_dataset(path, train=False, size=size)
        if val_fraction == 0:
            train_idx, val = torch.arange(len(full)), test
        else:
            train_idx, val_idx = _stratified_split(full.targets, (val_fraction,), seed, str(path))
            val = full.subset(val_idx, _cifar_transform(False, size))
        return {"train": full.subset(train_idx, _cifar_transform(augment, size)), "val": val, "test": test}

    size = 224 if size is None else size
    train_root, held_out = _imagefolder_roots(path)
    tree = _image_folder(train_root)
    targets = torch.tensor(tree.targets, dtype=torch.long)
    eval_transform = _imagefolder_transform(False, False, size)
    if held_out is None:
        if val_fraction == 0:
            raise BranchifyError(
                f"{path} is a single ImageFolder tree, so val and test are carved from it: val_fraction must be > 0 "
                "(or put the trees in root/train and root/val)")
        train_idx, val_idx, test_idx = _stratified_split(targets, (val_fraction, val_fraction), seed, str(path))
        test: Dataset = LabelledSubset(tree, test_idx.tolist(), eval_transform)
        val: Dataset = LabelledSubset(tree, val_idx.tolist(), eval_transform)
    else:
        test_tree = _image_folder(held_out)
        if test_tree.classes != tree.classes:
            only_train = sorted(set(tree.classes) - set(test_tree.classes))
            only_test = sorted(set(test_tree.classes) - set(tree.classes))
            raise BranchifyError(
                f"{train_root} and {held_out} have different classes (only in train: {only_train}, only in "
                f"{held_out.name}: {only_test}); give both trees the same class subfolders")
        test = LabelledSubset(test_tree, range(len(test_tree)), eval_transform)
        if val_fraction == 0:
            train_idx, val = torch.arange(len(tree)), test
        else:
            train_idx, val_idx = _stratified_split(targets, (val_fraction,), seed, str(train_root))
            val = LabelledSubset(tree, val_idx.tolist(), eval_transform)
    train = LabelledSubset(tree, train_idx.tolist(), _imagefolder_transform(True, augment, size))
    return {"train": train, "val": val, "test": test}


def load_dataset(spec: str | Path, split: str = "train", *, size: ImageSize | None = None, augment: bool = False,
                 seed: int = 0, val_fraction: float = 0.1) -> Dataset:
    """One split of a dataset named by ``spec``: ``"digits"``, a CIFAR-10 python folder, or an ImageFolder tree.

    ``val`` is carved from the training data (``val_fraction`` of it, stratified, fixed by
    ``seed``; 0 makes ``val`` the test set); digits always splits 60/20/20. ``size`` is the image
    side (default: 32 for digits and CIFAR-10, 224 for ImageFolder); ``augment`` applies to the
    ``train`` split of CIFAR-10 and ImageFolder data. Every dataset has ``.classes``.

    >>> from branchify.distiller.data import load_dataset
    >>> ds = load_dataset("digits", "val", size=16)
    >>> len(ds), tuple(ds[0][0].shape), len(ds.classes)
    (359, (3, 16, 16), 10)
    """
    _check_split(split)
    return load_splits(spec, size=size, augment=augment, seed=seed, val_fraction=val_fraction)[split]


def make_loaders(dataset: str | Path, batch_size: int = 128, workers: int = 0, seed: int = 0, *,
                 size: ImageSize | None = None, augment: bool = True, val_fraction: float = 0.1) -> Loaders:
    """Train, val and test ``DataLoader`` for ``dataset`` (see ``load_dataset``), deterministic under ``seed``.

    The training loader shuffles with its own generator seeded by ``seed`` (so the order does not
    depend on, or disturb, torch's global RNG); val and test keep their order. ``augment`` applies to
    the training split of CIFAR-10 and ImageFolder data; its random draws are deterministic under
    ``seed`` with ``workers > 0`` (each worker is seeded from the loader's generator) and come from
    torch's global RNG with ``workers=0``.

    >>> from branchify.distiller.data import make_loaders
    >>> loaders = make_loaders("digits", batch_size=64, seed=0)
    >>> images, labels = next(iter(loaders.train))
    >>> tuple(images.shape), loaders.num_classes, len(loaders.val.dataset)
    ((64, 3, 32, 32), 10, 359)
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise BranchifyError(f"batch size must be a positive int, got {batch_size!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise BranchifyError(f"workers must be an int >= 0 (0 loads in the main process), got {workers!r}")
    splits = load_splits(dataset, size=size, augment=augment, seed=seed, val_fraction=val_fraction)

    def loader(split: str) -> DataLoader:
        train = split == "train"
        # persistent workers: no re-fork of the worker processes at every pass of every epoch
        return DataLoader(splits[split], batch_size=batch_size, shuffle=train, num_workers=workers,
                          persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(seed) if train else None)

    return Loaders(*(loader(split) for split in SPLITS))
