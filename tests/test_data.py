"""Datasets from local files: digits, a CIFAR-10 python folder, an ImageFolder tree, and their loaders."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import branchify as bx
from branchify.distiller.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    LabelledSubset,
    TensorImages,
    _stratified_split,
    cifar10_dataset,
    digits_dataset,
    imagefolder_dataset,
    load_dataset,
    load_splits,
    make_loaders,
)

CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


# --- digits ------------------------------------------------------------------------------------


def test_digits_splits_cover_the_dataset_per_class():
    splits = {name: digits_dataset(name) for name in ("train", "val", "test")}
    assert sum(len(ds) for ds in splits.values()) == 1797
    counts = {name: torch.bincount(ds.targets, minlength=10) for name, ds in splits.items()}
    total = sum(counts.values())
    for name, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert torch.all((counts[name] / total - share).abs() < 0.01), name
    assert splits["train"].classes == [str(c) for c in range(10)]


def test_digits_images_are_three_equal_normalized_channels():
    train = digits_dataset("train", size=24)
    image, label = train[5]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32 and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert abs(train.images.mean().item()) < 1e-4 and abs(train.images.std().item() - 1) < 1e-3


def test_digits_is_deterministic_under_its_seed():
    a, b, c = digits_dataset("val", seed=3), digits_dataset("val", seed=3), digits_dataset("val", seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)


def test_digits_rejects_bad_split_and_size():
    with pytest.raises(bx.BranchifyError, match="unknown split 'validation'"):
        digits_dataset("validation")
    with pytest.raises(bx.BranchifyError, match="size must be a positive int"):
        digits_dataset(size=0)


def test_stratified_split_is_a_disjoint_cover():
    targets = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)
    rest, a, b = _stratified_split(targets, (0.1, 0.2), seed=0, what="t")
    everything = torch.cat([rest, a, b])
    assert sorted(everything.tolist()) == list(range(60))
    assert torch.bincount(targets[a]).tolist() == [1, 2, 3]
    assert torch.bincount(targets[b]).tolist() == [2, 4, 6]
    with pytest.raises(bx.BranchifyError, match="too few"):
        _stratified_split(torch.tensor([0, 0, 1, 1]), (0.1,), seed=0, what="tiny")


# --- CIFAR-10 ----------------------------------------------------------------------------------


def write_cifar(folder: Path, per_batch: int = 4, *, meta: bool = True) -> dict[str, np.ndarray]:
    """A CIFAR-10 python folder in the real format, with labels alternating between classes 0 and 1."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": [i % 2 for i in range(per_batch)],
                 b"data": data, b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = data
    if meta:
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": CIFAR_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f,
                        protocol=2)
    return written


def test_cifar_folder_is_read_in_its_real_layout(tmp_path):
    written = write_cifar(tmp_path / "cifar")
    train = cifar10_dataset(tmp_path / "cifar")
    assert len(train) == 20 and train.classes[:2] == ["airplane", "automobile"] and len(train.classes) == 10
    assert train.targets.tolist() == [0, 1, 0, 1] * 5
    row = written["data_batch_2"][1]  # sample 5 of the concatenated training set
    assert torch.equal(train.images[5], torch.from_numpy(row.reshape(3, 32, 32)))
    image, label = train[5]
    assert label == 1 and image.shape == (3, 32, 32)
    red = (row[0] / 255 - CIFAR10_MEAN[0]) / CIFAR10_STD[0]  # pixel (0, 0) of the red plane
    blue = (row[2 * 1024 + 33] / 255 - CIFAR10_MEAN[2]) / CIFAR10_STD[2]  # pixel (1, 1) of the blue plane
    assert image[0, 0, 0].item() == pytest.approx(red, abs=1e-5)
    assert image[2, 1, 1].item() == pytest.approx(blue, abs=1e-5)
    test = cifar10_dataset(tmp_path / "cifar", train=False)
    assert torch.equal(test.images.reshape(4, -1), torch.from_numpy(written["test_batch"]))


def test_cifar_parent_folder_and_missing_meta_are_accepted(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", meta=False)
    ds = cifar10_dataset(tmp_path, train=False, size=16)
    assert ds.classes[-1] == "truck" and ds[0][0].shape == (3, 16, 16)


def test_cifar_missing_batch_is_named(tmp_path):
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").unlink()
    with pytest.raises(bx.BranchifyError, match=r"lacks \['data_batch_3'\]"):
        cifar10_dataset(tmp_path / "c")


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
    write_cifar(tmp_path / "c")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with open(tmp_path / "c" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f, protocol=2)
    with pytest.raises(bx.BranchifyError, match=r"data_batch_1 is not a CIFAR-10 python batch \(refusing"):
        cifar10_dataset(tmp_path / "c")
    assert not marker.exists()


def test_cifar_wrong_content_is_rejected(tmp_path):
    write_cifar(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]}, f, protocol=2)
    with pytest.raises(bx.BranchifyError, match="test_batch is not a CIFAR-10 batch"):
        cifar10_dataset(tmp_path / "c", train=False)


def test_cifar_splits_carve_val_from_train_without_augmentation(tmp_path):
    write_cifar(tmp_path / "c")
    splits = load_splits(tmp_path / "c", augment=True, val_fraction=0.1, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [18, 2, 4]
    assert sorted(splits["val"].targets.tolist()) == [0, 1]
    torch.manual_seed(0)
    val_reads = [splits["val"][0][0] for _ in range(2)]
    train_reads = [splits["train"][0][0] for _ in range(8)]
    assert torch.equal(*val_reads)
    assert any(not torch.equal(train_reads[0], t) for t in train_reads[1:])
    no_val = load_splits(tmp_path / "c", val_fraction=0)
    assert len(no_val["train"]) == 20 and no_val["val"] is no_val["test"]


# --- ImageFolder -------------------------------------------------------------------------------


def write_tree(root: Path, classes=("cat", "dog"), per_class: int = 10, grey: bool = False) -> None:
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(12, 10) if grey else (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_imagefolder_single_tree(tmp_path):
    write_tree(tmp_path / "tree", grey=True)
    splits = load_splits(tmp_path / "tree", size=16, val_fraction=0.1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    image, label = splits["train"][0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and type(image) is torch.Tensor
    assert splits["val"].classes == ["cat", "dog"] and sorted(splits["test"].targets) == [0, 1]
    whole = imagefolder_dataset(tmp_path / "tree", size=8)
    assert isinstance(whole, LabelledSubset) and len(whole) == 20 and whole[0][0].shape == (3, 8, 8)


def test_imagefolder_train_val_layout(tmp_path):
    write_tree(tmp_path / "data" / "train")
    write_tree(tmp_path / "data" / "val", per_class=3)
    splits = load_splits(tmp_path / "data", size=16, augment=True, val_fraction=0.2)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 4, 6]
    assert splits["test"].targets == [0, 0, 0, 1, 1, 1]
    assert len(imagefolder_dataset(tmp_path / "data", train=False, size=16)) == 6
    assert len(imagefolder_dataset(tmp_path / "data", train=True, size=16)) == 20
    assert splits["train"][3][0].shape == (3, 16, 16)


def test_imagefolder_trees_must_share_classes(tmp_path):
    write_tree(tmp_path / "data" / "train")
    write_tree(tmp_path / "data" / "val", classes=("cat", "fox"), per_class=2)
    with pytest.raises(bx.BranchifyError, match=r"only in train: \['dog'\], only in val: \['fox'\]"):
        load_splits(tmp_path / "data")


def test_imagefolder_without_images_is_explained(tmp_path):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(bx.BranchifyError, match="is not an ImageFolder tree.*one subfolder per class"):
        load_dataset(tmp_path / "tree")


# --- dispatch and loaders ----------------------------------------------------------------------


def test_load_dataset_dispatches_on_what_it_finds(tmp_path):
    write_cifar(tmp_path / "cifar")
    write_tree(tmp_path / "tree")
    assert isinstance(load_dataset("digits"), TensorImages) and len(load_dataset("DIGITS", "test")) == 359
    cifar = load_dataset(str(tmp_path / "cifar"), "test")
    assert isinstance(cifar, TensorImages) and cifar.classes[0] == "airplane"
    tree = load_dataset(tmp_path / "tree", "val", size=8)
    assert isinstance(tree, LabelledSubset) and tree.classes == ["cat", "dog"]


def test_load_dataset_explains_a_bad_path(tmp_path):
    with pytest.raises(bx.BranchifyError, match=r"nowhere does not exist; give 'digits', a CIFAR-10 python folder"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(bx.BranchifyError, match="is a file, not a folder"):
        load_dataset(tmp_path / "file.txt")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(bx.BranchifyError, match=r"flat holds \['a.png'\], which fits no known layout"):
        load_dataset(tmp_path / "flat")
    with pytest.raises(bx.BranchifyError, match="dataset must be 'digits' or a path"):
        load_dataset(3)
    with pytest.raises(bx.BranchifyError, match="val_fraction must be in"):
        load_dataset("digits", val_fraction=0.5)


def first_batch(loaders):
    return next(iter(loaders.train))


def test_make_loaders_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = make_loaders("digits", batch_size=32, seed=1), make_loaders("digits", batch_size=32, seed=1)
    (xa, ya), (xb, yb) = first_batch(a), first_batch(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first_batch(make_loaders("digits", batch_size=32, seed=2))[1], ya)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.num_classes == 10 and a.classes[9] == "9"
    val_labels = torch.cat([y for _, y in a.val])
    assert torch.equal(val_labels, a.val.dataset.targets)  # val keeps its order


def test_make_loaders_with_workers_augments_deterministically(tmp_path):
    write_cifar(tmp_path / "c")
    batches = [first_batch(make_loaders(tmp_path / "c", batch_size=6, workers=1, seed=5))[0] for _ in range(2)]
    assert torch.equal(*batches)


def test_make_loaders_rejects_bad_arguments():
    with pytest.raises(bx.BranchifyError, match="batch size must be a positive int, got 0"):
        make_loaders("digits", batch_size=0)
    with pytest.raises(bx.BranchifyError, match="workers must be an int >= 0"):
        make_loaders("digits", workers=-1)
