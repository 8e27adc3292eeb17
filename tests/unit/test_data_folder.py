"""Image folders: labels from sub-folders or file-name prefixes, channels, resizing, and bad files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data import CorruptDataError, DiffusionDataModule, MissingDataError
from diffusion_lab.data.mnist import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx

PER_CLASS = 4


@pytest.fixture(scope="module")
def digits(shared_data):
    """Real MNIST test images: {label: [(28, 28) uint8, ...]} for labels 0-2."""
    root = shared_data / "mnist"
    images = read_idx(root / "t10k-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC)
    labels = read_idx(root / "t10k-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC)
    return {c: [images[i] for i in np.flatnonzero(labels == c)[:PER_CLASS]] for c in range(3)}


def _dm(root, tmp_path, **kw):
    kw = {"image_size": 28, "channels": 1, "val_fraction": 0.25, "cache_dir": tmp_path / "cache", **kw}
    return DiffusionDataModule(name="folder", root=root, **kw)


def _all(dm):
    dm.prepare_data()
    part = dm.plan()[0]
    entry = dm.load_part(part)
    return entry["images"], entry["labels"]


@pytest.fixture
def subdir_tree(tmp_path, digits):
    root = tmp_path / "tree"
    for c, imgs in digits.items():
        (root / str(c) / "nested").mkdir(parents=True)
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(root / str(c) / ("nested" if i % 2 else "") / f"img{i}.png")
    return root


def test_subdir_labels_and_exact_pixels(subdir_tree, tmp_path, digits):
    dm = _dm(subdir_tree, tmp_path, labels="subdir")
    assert (dm.channels, dm.num_classes, dm.image_size) == (1, 3, 28)
    x, y = _all(dm)
    assert x.shape == (3 * PER_CLASS, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [PER_CLASS] * 3
    # PNG is lossless and 28 -> 28 needs no resizing: every real image comes back exactly, under its label
    got = {(int(lab), x[k, 0].numpy().tobytes()) for k, lab in enumerate(y)}
    assert got == {(c, a.tobytes()) for c, imgs in digits.items() for a in imgs}
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (9, 1, 28, 28) and -1 <= xb.min() and xb.max() <= 1 and yb.dtype == torch.int64


def test_prefix_labels(tmp_path, digits):
    root = tmp_path / "letters"
    root.mkdir()
    for c, imgs in digits.items():
        for i, a in enumerate(imgs):
            Image.fromarray(a).save(root / f"{c + 5}.{i}.png")  # "<label>.<n>.png"
    dm = _dm(root, tmp_path, labels="prefix")
    assert dm.num_classes == 8
    _, y = _all(dm)
    assert sorted(set(y.tolist())) == [5, 6, 7]


def test_no_labels_rgb_resize_and_crop(tmp_path, digits):
    root = tmp_path / "plain"
    root.mkdir()
    wide = np.concatenate([digits[0][0], digits[1][0]], axis=1)  # 28 x 56: two digits side by side
    Image.fromarray(wide).save(root / "wide.png")
    Image.fromarray(digits[2][0]).convert("RGB").save(root / "rgb.jpg", quality=95)
    dm = _dm(root, tmp_path, labels="none", channels=3, image_size=16)
    assert dm.num_classes == 1
    x, y = _all(dm)
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 0]
    assert torch.equal(x[:, 0], x[:, 1])  # grey content repeated over RGB
    # "wide.png" (second in path order) is resized to 16 x 32 and centre-cropped: it shows the middle 28 x 28
    # of the source, the right half of the "0" and the left half of the "1"
    middle = torch.from_numpy(wide[:, 14:42].astype(np.float32))[None, None]
    ref = torch.nn.functional.interpolate(middle, size=(16, 16), mode="bilinear", antialias=True)[0, 0]
    assert (x[1, 0].float() - ref).abs().mean() < 8
    assert (x[1, 0].float() - ref.flip(-1)).abs().mean() > 30


def test_channels_inferred_and_mixed_refused(tmp_path, digits):
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(digits[0][0]).save(root / "a.png")
    dm = _dm(root, tmp_path, channels=None)
    assert dm.channels == 1
    Image.fromarray(digits[1][0]).convert("RGB").save(root / "b.png")
    dm = _dm(root, tmp_path, channels=None)
    with pytest.raises(ValueError, match="mixed channel counts.*a.png.*b.png"):
        dm.prepare_data()
    x, _ = _all(_dm(root, tmp_path, channels=1))  # forcing the channel count converts instead
    assert x.shape == (2, 1, 28, 28)


@pytest.mark.parametrize("case", ["empty", "garbage", "truncated"])
def test_bad_image_files_are_named(tmp_path, digits, case):
    root = tmp_path / "bad"
    root.mkdir()
    Image.fromarray(digits[0][0]).save(root / "good.png")
    bad = root / "bad.png"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "garbage":
        bad.write_bytes(gzip.compress(b"not an image"))
    else:
        Image.fromarray(digits[0][1]).save(bad)
        bad.write_bytes(bad.read_bytes()[:60])
    dm = _dm(root, tmp_path)
    with pytest.raises(CorruptDataError, match="bad.png") as e:
        dm.prepare_data()
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(MissingDataError, match="is not a folder.*dataset.root="):
        _dm(tmp_path / "nope", tmp_path).prepare_data()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(MissingDataError, match="no PNG/JPEG images"):
        _dm(tmp_path / "empty", tmp_path).prepare_data()


def test_label_layout_errors(tmp_path, digits):
    root = tmp_path / "flat"
    root.mkdir()
    Image.fromarray(digits[0][0]).save(root / "nolabel.png")
    with pytest.raises(ValueError, match="nolabel.png.*numeric label prefix"):
        _dm(root, tmp_path, labels="prefix").prepare_data()
    with pytest.raises(ValueError, match="nolabel.png.*not inside a class sub-folder"):
        _dm(root, tmp_path, labels="subdir").prepare_data()
    with pytest.raises(ValueError, match="labels must be one of"):
        _dm(root, tmp_path, labels="filename")


def test_cache_of_a_converting_run_does_not_hide_a_mixed_folder(tmp_path, digits):
    """A warm cache from channels=3 must not let a channels=null run skip the mixed-channel check."""
    root = tmp_path / "mixed"
    root.mkdir()
    Image.fromarray(digits[0][0]).convert("RGB").save(root / "a.png")  # first file colour: inferred 3
    Image.fromarray(digits[1][0]).save(root / "b.png")
    x, _ = _all(_dm(root, tmp_path, channels=3))  # warms the cache with both images as RGB
    assert x.shape == (2, 3, 28, 28)
    with pytest.raises(ValueError, match="mixed channel counts"):
        _dm(root, tmp_path, channels=None).prepare_data()
