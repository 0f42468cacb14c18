"""Datasets and loaders from local files only: nothing here ever downloads.

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

import codecs
import functools
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..errors import BranchifyError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "LabelledSubset",
    "Loaders",
    "TensorImages",
    "cifar10_dataset",
    "digits_dataset",
    "imagefolder_dataset",
    "load_dataset",
    "load_splits",
    "make_loaders",
]

SPLITS = ("train", "val", "test")
# Per-channel statistics of the 50,000 CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_META = "batches.meta"
_CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_EXPECTED = (
    "'digits', a CIFAR-10 python folder (data_batch_1..5, test_batch, batches.meta, or its parent holding "
    "cifar-10-batches-py), or an ImageFolder tree (root/train + root/val, or one folder of class subfolders "
    "of images)")


class TensorImages(Dataset):
    """Images held in one tensor, with integer labels and class names.

    ``images`` is ``(N, C, H, W)``; ``transform`` (if any) is applied to each image when it is
    read, so that random augmentation differs per epoch. ``targets`` is a ``LongTensor``.

    >>> import torch
    >>> from branchify.distiller.data import TensorImages
    >>> ds = TensorImages(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), ["a", "b"])
    >>> image, label = ds[1]
    >>> tuple(image.shape), label, len(ds)
    ((3, 8, 8), 1, 4)
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor | Sequence[int], classes: Sequence[str],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long)
        if images.ndim != 4 or len(images) != len(targets):
            raise BranchifyError(
                f"TensorImages needs (N, C, H, W) images and N targets, got images {tuple(images.shape)} and "
                f"{len(targets)} targets")
        self.images = images
        self.targets = targets
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def subset(self, indices: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> TensorImages:
        """The samples at ``indices``, read through ``transform``."""
        return TensorImages(self.images[indices], self.targets[indices], self.classes, transform)


class LabelledSubset(Dataset):
    """Some samples of an ImageFolder-like dataset, read through their own transform.

    It keeps the dataset's ``classes`` and the ``targets`` of its samples, so that a train and a
    val split of one tree can share the file scan and differ in augmentation.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable | None = None) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.classes = list(dataset.classes)  # type: ignore[attr-defined]
        all_targets = dataset.targets  # type: ignore[attr-defined]
        self.targets = [int(all_targets[i]) for i in self.indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.dataset[self.indices[index]]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target)


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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise BranchifyError(f"unknown split {split!r}; use one of {list(SPLITS)}")


def _check_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 0.5:
        raise BranchifyError(
            f"val_fraction must be in [0, 0.5), got {val_fraction!r}; 0.1 holds out a tenth of the training data")


def _stratified_split(targets: torch.Tensor, fractions: Sequence[float], seed: int,
                      what: str) -> list[torch.Tensor]:
    """Indices ``[rest, part_1, ..., part_k]``: each class gives ``round(f * n_class)`` samples to part ``f``."""
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for label in torch.unique(targets, sorted=True).tolist():
        members = torch.nonzero(targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for k, fraction in enumerate(fractions, start=1):
            count = round(fraction * len(members))
            parts[k].append(members[start:start + count])
            start += count
        parts[0].append(members[start:])
    result = [torch.cat(p).sort().values for p in parts]
    empty = [k for k, p in enumerate(result) if len(p) == 0]
    if empty:
        raise BranchifyError(
            f"{what} has {len(targets)} samples: too few to carve fractions {list(fractions)} per class (a split "
            "would be empty); add samples or raise val_fraction")
    return result


# --- digits ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BranchifyError(
            "the 'digits' dataset comes with scikit-learn, which is not installed; "
            "pip install 'branchify[data]' (or scikit-learn)") from None
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)  # pixel values are 0..16
    return images, torch.from_numpy(bunch.target).long()


def _grey_to_rgb(image: torch.Tensor) -> torch.Tensor:
    return image.expand(3, -1, -1)


def digits_dataset(split: str = "train", size: int = 32, seed: int = 0) -> TensorImages:
    """scikit-learn's handwritten digits as 3-channel ``size`` x ``size`` images (offline, 10 classes).

    The 8x8 images are scaled to [0, 1], resized bilinearly, and normalized with the mean and std of
    the training split; they are stored with one channel and read as three identical ones. The
    split is 60/20/20 per class, fixed by ``seed``.

    >>> from branchify.distiller.data import digits_dataset
    >>> train, test = digits_dataset("train"), digits_dataset("test")
    >>> len(train), len(digits_dataset("val")), len(test), tuple(train[0][0].shape)
    (1079, 359, 359, (3, 32, 32))
    >>> train.classes[:3]
    ['0', '1', '2']
    """
    _check_split(split)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise BranchifyError(f"size must be a positive int (pixels per side), got {size!r}")
    images, targets = _digits_arrays()
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    parts = _stratified_split(targets, (0.2, 0.2), seed, "digits")
    train = images[parts[0]]
    images = (images - train.mean()) / train.std()
    chosen = parts[SPLITS.index(split)]
    return TensorImages(images[chosen], targets[chosen], [str(c) for c in range(10)], _grey_to_rgb)


# --- CIFAR-10 ----------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's python batches, which exist only as pickles.

    Unpickling can run arbitrary code, so only the globals that a pickled numpy array needs are
    resolved (``_codecs.encode`` appears when Python 3 writes bytes at protocol 2); any other global
    is refused, which makes a tampered file fail instead of executing.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR-10 batch holds only numpy arrays and lists") from None


def _read_batch(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            # Python 2 wrote these files; "bytes" keeps its str keys and array buffers as bytes.
            content = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise BranchifyError(
            f"{path} is not a CIFAR-10 python batch ({err}); re-extract cifar-10-python.tar.gz") from None
    if not isinstance(content, dict):
        raise BranchifyError(f"{path} holds a {type(content).__name__}, not a CIFAR-10 batch dict")
    return content


def _cifar_folder(path: Path) -> Path | None:
    """The folder holding the CIFAR-10 batches: ``path`` itself or its ``cifar-10-batches-py``."""
    names = (*_CIFAR_TRAIN, _CIFAR_TEST, _CIFAR_META)
    for folder in (path, path / _CIFAR_DIR):
        if folder.is_dir() and any((folder / name).is_file() for name in names):
            return folder
    return None


def _cifar_arrays(folder: Path, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise BranchifyError(
            f"CIFAR-10 folder {folder} lacks {missing}; it needs data_batch_1..5 and test_batch as extracted "
            "from cifar-10-python.tar.gz")
    images, labels = [], []
    for name in names:
        batch = _read_batch(folder / name)
        data, batch_labels = batch.get(b"data"), batch.get(b"labels")
        if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
                or batch_labels is None or len(batch_labels) != len(data):
            raise BranchifyError(
                f"{folder / name} is not a CIFAR-10 batch: it needs b'data' (N x 3072 uint8) and N b'labels'; "
                "is this CIFAR-100 or another format? Convert it to an ImageFolder tree instead")
        images.append(data.astype(np.uint8, copy=False))
        labels.extend(int(label) for label in batch_labels)
    # Each row holds the red, green and blue 32x32 planes one after the other, row-major.
    array = np.concatenate(images).reshape(-1, 3, 32, 32)
    return torch.from_numpy(array), torch.tensor(labels, dtype=torch.long)


def _cifar_classes(folder: Path) -> list[str]:
    if not (folder / _CIFAR_META).is_file():
        return list(_CIFAR_CLASSES)
    names = _read_batch(folder / _CIFAR_META).get(b"label_names")
    if not names:
        raise BranchifyError(f"{folder / _CIFAR_META} has no b'label_names'; re-extract cifar-10-python.tar.gz")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_transform(augment: bool, size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    steps: list[Callable] = []
    if augment:  # the standard light CIFAR augmentation (He et al., section 4.2)
        steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if size is not None and size != 32:
        steps.append(v2.Resize((size, size), antialias=True))
    steps.append(v2.Normalize(CIFAR10_MEAN, CIFAR10_STD))
    return v2.Compose(steps)


def cifar10_dataset(root: str | Path, train: bool = True, *, augment: bool = False,
                    size: int | None = None) -> TensorImages:
    """CIFAR-10 from a local python folder (``data_batch_1..5``, ``test_batch``, ``batches.meta``).

    ``root`` is that folder or its parent holding ``cifar-10-batches-py``. Images are normalized
    with CIFAR-10's per-channel mean and std; ``augment`` adds a random 32x32 crop of the 4-pixel
    padded image and a random horizontal flip; ``size`` resizes (32 by default).

    >>> import branchify as bx
    >>> from branchify.distiller.data import cifar10_dataset
    >>> try:
    ...     cifar10_dataset("/no/such/folder")
    ... except bx.BranchifyError as err:
    ...     print(str(err).split(";")[0])
    no CIFAR-10 python batches in /no/such/folder (nor in /no/such/folder/cifar-10-batches-py)
    """
    path = Path(root).expanduser()
    folder = _cifar_folder(path)
    if folder is None:
        raise BranchifyError(
            f"no CIFAR-10 python batches in {path} (nor in {path / _CIFAR_DIR}); expected data_batch_1..5, "
            "test_batch and batches.meta as extracted from cifar-10-python.tar.gz")
    images, targets = _cifar_arrays(folder, _CIFAR_TRAIN if train else (_CIFAR_TEST,))
    return TensorImages(images, targets, _cifar_classes(folder), _cifar_transform(augment, size))


# --- ImageFolder -------------------------------------------------------------------------------


def _imagefolder_transform(train: bool, augment: bool, size: int) -> Callable:
    if train and augment:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        # The usual evaluation crop: resize the short side to size * 256/224, then centre-crop.
        steps = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), v2.ToPureTensor()])


def _image_folder(path: Path) -> torchvision.datasets.ImageFolder:
    try:
        return torchvision.datasets.ImageFolder(str(path))
    except (FileNotFoundError, OSError) as err:
        raise BranchifyError(
            f"{path} is not an ImageFolder tree ({err}); it needs one subfolder per class holding image files "
            f"(.png, .jpg, ...). Expected {_EXPECTED}") from None


def _imagefolder_roots(path: Path) -> tuple[Path, Path | None]:
    """The training tree and the separate held-out tree (None for a single tree)."""
    if (path / "train").is_dir():
        held_out = next((path / name for name in ("val", "test") if (path / name).is_dir()), None)
        return path / "train", held_out
    return path, None


def imagefolder_dataset(root: str | Path, train: bool = True, size: int = 224, *,
                        augment: bool = False) -> Dataset:
    """An ImageFolder tree with the standard ImageNet transforms (``size`` x ``size`` crops).

    With a ``root/train`` + ``root/val`` (or ``root/test``) layout, ``train`` picks the tree;
    otherwise ``root`` itself is the tree. ``augment`` (training only) uses a random resized crop
    and a horizontal flip; otherwise the short side is resized to ``size * 256/224`` and
    centre-cropped. Images are normalized with ImageNet's mean and std.

    >>> import branchify as bx
    >>> from branchify.distiller.data import imagefolder_dataset
    >>> try:
    ...     imagefolder_dataset("/no/such/tree")
    ... except bx.BranchifyError as err:
    ...     print(str(err).split(" (")[0])
    /no/such/tree is not an ImageFolder tree
    """
    path = Path(root).expanduser()
    train_root, held_out = _imagefolder_roots(path)
    tree = train_root if train or held_out is None else held_out
    dataset = _image_folder(tree)
    return LabelledSubset(dataset, range(len(dataset)), _imagefolder_transform(train, augment, size))


# --- dispatch ----------------------------------------------------------------------------------


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


def load_splits(spec: str | Path, *, size: int | None = None, augment: bool = False, seed: int = 0,
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


def load_dataset(spec: str | Path, split: str = "train", *, size: int | None = None, augment: bool = False,
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
                 size: int | None = None, augment: bool = True, val_fraction: float = 0.1) -> Loaders:
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
