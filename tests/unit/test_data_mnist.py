"""MNIST: the IDX reader on the real t10k files, the offline split, and every corruption case."""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import urllib.request

import numpy as np
import pytest
import torch

from diffusion_lab.data import CorruptDataError, DiffusionDataModule, MissingDataError
from diffusion_lab.data.mnist import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST_MD5,
    MnistSource,
    read_idx,
    read_mnist_pair,
)

IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"
# Label histogram of the official MNIST test split.
TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def t10k(shared_data):
    root = shared_data / "mnist"
    return read_mnist_pair(root / IMAGES, root / LABELS)


def _no_network(*args, **kwargs):
    raise AssertionError("a network request was attempted")


def test_real_test_split_counts_and_known_image(t10k):
    images, labels = t10k
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == TEST_HIST
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # record 0 (a "7"), decoded
    assert int(images[0].sum()) == 18454
    assert _sha(images[0]) == "8f6a418c9a639f9e14e96feca47a97df2a35a0a68ae2875431c5c80e05536941"
    assert _sha(images) == "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161"
    # structure: bright ink on a dark background, digits inside the central 20x20 box
    assert 0.12 < (images > 127).mean() < 0.15
    assert abs(images.mean() - 33.79) < 0.01
    frame = np.concatenate([images[:, :2].ravel(), images[:, -2:].ravel(), images[:, :, :2].ravel()])
    assert (frame > 127).mean() < 0.005  # the 2-pixel frame holds ~100x less ink than the image overall


def test_offline_test_split_trains_without_network(shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    dm = DiffusionDataModule(
        name="mnist",
        root=shared_data / "mnist",
        split="test",
        download=True,
        cache_dir=tmp_path,
        val_fraction=0.05,
    )
    assert (dm.name, dm.image_size, dm.channels, dm.num_classes) == ("mnist", 28, 1, 10)
    dm.prepare_data()
    dm.setup()
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [9500, 500, 500]
    val_x, val_y = dm.real_images("val")
    test_x, test_y = dm.real_images("test")
    assert torch.equal(val_x, test_x) and torch.equal(
        val_y, test_y
    )  # the test loader serves the held-out slice
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1


def test_resize_and_channels(shared_data):
    src = MnistSource(root=shared_data / "mnist", image_size=32, channels=3)
    x, y, _ = src.decode("test")
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 2])
    assert abs(x.float().mean().item() / 33.79 - 1) < 0.05  # resizing keeps the mean intensity


def test_missing_train_files_names_everything(shared_data, tmp_path):
    root = shared_data / "mnist"
    dm = DiffusionDataModule(name="mnist", root=root, split="train", download=False, cache_dir=tmp_path)
    with pytest.raises(MissingDataError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("'mnist'", "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", str(root)):
        assert part in msg
    assert "dataset.download=true" in msg and "dataset.root=" in msg and "dataset.split=test" in msg


def _write_gz(path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data, compresslevel=1, mtime=0))


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + payload


@pytest.fixture(scope="module")
def raw_t10k(shared_data):
    root = shared_data / "mnist"
    return gzip.decompress((root / IMAGES).read_bytes()), gzip.decompress((root / LABELS).read_bytes())


@pytest.mark.parametrize(
    "case, match",
    [
        ("wrong_magic", "wrong magic 0x00000801"),
        ("truncated_data", "truncated data"),
        ("truncated_gzip", "gzip stream is truncated"),
        ("truncated_header", "truncated header"),
        ("trailing_bytes", "unexpected bytes"),
        ("count_mismatch", "count mismatch"),
        ("bad_label", "record 3 has label 10"),
    ],
)
def test_corrupt_idx_is_refused(raw_t10k, tmp_path, case, match):
    images, labels = raw_t10k
    img_path, lab_path = tmp_path / IMAGES, tmp_path / LABELS
    _write_gz(img_path, images)
    _write_gz(lab_path, labels)
    if case == "wrong_magic":
        _write_gz(img_path, labels)
    elif case == "truncated_data":
        _write_gz(img_path, images[:-100])
    elif case == "truncated_gzip":
        img_path.write_bytes(gzip.compress(images, compresslevel=1, mtime=0)[:-5000])
    elif case == "truncated_header":
        _write_gz(img_path, images[:10])
    elif case == "trailing_bytes":
        _write_gz(img_path, images + b"\0" * 7)
    elif case == "count_mismatch":
        _write_gz(lab_path, _idx(IDX_LABELS_MAGIC, (9999,), labels[8 : 8 + 9999]))
    elif case == "bad_label":
        bad = bytearray(labels)
        bad[8 + 3] = 10
        _write_gz(lab_path, bytes(bad))
    with pytest.raises(CorruptDataError, match=match) as e:
        read_mnist_pair(img_path, lab_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_corrupt_file_leaves_no_cache_entry(shared_data, tmp_path):
    root, cache = tmp_path / "mnist", tmp_path / "cache"
    root.mkdir()
    shutil.copy(shared_data / "mnist" / LABELS, root / LABELS)
    shutil.copy(shared_data / "mnist" / LABELS, root / IMAGES)  # labels where images belong
    dm = DiffusionDataModule(name="mnist", root=root, split="test", download=False, cache_dir=cache)
    with pytest.raises(CorruptDataError, match="wrong magic"):
        dm.prepare_data()
    assert not list(cache.glob("*.pt")) and not list(cache.glob("*.tmp"))


def test_plain_idx_files_are_read(raw_t10k, tmp_path):
    images, _ = raw_t10k
    (tmp_path / "x-idx3-ubyte").write_bytes(images)
    assert read_idx(tmp_path / "x-idx3-ubyte", IDX_IMAGES_MAGIC).shape == (10000, 28, 28)


def test_local_file_unlike_the_published_one_is_warned_about_once(shared_data, tmp_path, caplog):
    """A local .gz that is not the published file (here: the same images, compressed again) trains, with one
    warning line naming the file and the published md5; the published files pass silently."""
    root = tmp_path / "mnist"
    root.mkdir()
    shutil.copy(shared_data / "mnist" / LABELS, root / LABELS)
    _write_gz(root / IMAGES, gzip.decompress((shared_data / "mnist" / IMAGES).read_bytes()))
    dm = DiffusionDataModule(name="mnist", root=root, split="test", download=False, cache_dir=tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="diffusion_lab.data.mnist"):
        dm.prepare_data()
        dm.setup()
    warned = [r.getMessage() for r in caplog.records if r.name == "diffusion_lab.data.mnist"]
    assert len(warned) == 1, warned
    assert str(root / IMAGES) in warned[0] and MNIST_MD5[IMAGES] in warned[0] and "\n" not in warned[0]
    assert len(dm.dataset("train")) == 9500, "it still trains"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusion_lab.data.mnist"):
        DiffusionDataModule(
            name="mnist", root=shared_data / "mnist", split="test", cache_dir=tmp_path / "c"
        ).prepare_data()
    assert not [r for r in caplog.records if r.name == "diffusion_lab.data.mnist"]
