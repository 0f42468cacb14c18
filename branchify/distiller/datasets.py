"""The datasets themselves, read from local files only: scikit-learn's digits, CIFAR-10's python
batches, ImageFolder trees; and the stratified carving of splits. Nothing here ever downloads."""

from __future__ import annotations

import codecs
import functools
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import Dataset
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
    "ImageSize",
    "LabelledSubset",
    "TensorImages",
    "cifar10_dataset",
    "digits_dataset",
    "image_size",
    "imagefolder_dataset",
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


ImageSize = int | tuple[int, int]


def image_size(size: ImageSize, what: str = "size") -> tuple[int, int]:
    """``(height, width)`` of ``size``: one side for square images, or a height and a width.

    >>> image_size(32), image_size((24, 40))
    ((32, 32), (24, 40))
    """
    sides = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else None
    if sides is None or len(sides) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in sides):
        raise BranchifyError(f"{what} must be a positive int (pixels per side) or a (height, width) pair, got {size!r}")
    return sides


def _grey_to_rgb(image: torch.Tensor) -> torch.Tensor:
    return image.expand(3, -1, -1)


def digits_dataset(split: str = "train", size: ImageSize = 32, seed: int = 0) -> TensorImages:
    """scikit-learn's handwritten digits as 3-channel ``size`` x ``size`` images (offline, 10 classes);
    ``size`` may also be a ``(height, width)`` pair.

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
    sides = image_size(size)
    images, targets = _digits_arrays()
    if sides != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=sides, mode="bilinear", align_corners=False)
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


def _cifar_transform(augment: bool, size: ImageSize | None) -> Callable[[torch.Tensor], torch.Tensor]:
    steps: list[Callable] = []
    if augment:  # the standard light CIFAR augmentation (He et al., section 4.2)
        steps += [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if size is not None and image_size(size) != (32, 32):
        steps.append(v2.Resize(image_size(size), antialias=True))
    steps.append(v2.Normalize(CIFAR10_MEAN, CIFAR10_STD))
    return v2.Compose(steps)


def cifar10_dataset(root: str | Path, train: bool = True, *, augment: bool = False,
                    size: ImageSize | None = None) -> TensorImages:
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


def _imagefolder_transform(train: bool, augment: bool, size: ImageSize) -> Callable:
    sides = image_size(size)
    if train and augment:
        steps = [v2.RandomResizedCrop(sides, antialias=True), v2.RandomHorizontalFlip()]
    else:
        # The usual evaluation crop: resize the short side to 256/224 of the crop's longer side, then centre-crop.
        steps = [v2.Resize(round(max(sides) * 256 / 224), antialias=True), v2.CenterCrop(sides)]
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


def imagefolder_dataset(root: str | Path, train: bool = True, size: ImageSize = 224, *,
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
