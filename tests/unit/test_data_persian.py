"""Hoda Persian digits: the CDB decoder on the real files, fitting, the DataModule, cache, and corruption."""

from __future__ import annotations

import hashlib
import shutil
import struct
import urllib.request

import numpy as np
import pytest
import torch

from diffusion_lab.data import CorruptDataError, DiffusionDataModule, MissingDataError, read_cdb
from diffusion_lab.data.persian import PersianSource, fit_in_box

TEST = "Test 20000.cdb"
REMAINING = "RemainingSamples.cdb"
REMAINING_HIST = [2070, 2330, 1923, 2334, 2333, 2110, 2254, 2363, 2264, 2371]


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def hoda_test(shared_data):
    return read_cdb(shared_data / "hoda" / TEST)


@pytest.fixture(scope="module")
def hoda_remaining(shared_data):
    return read_cdb(shared_data / "hoda" / REMAINING)


@pytest.fixture(scope="module")
def fitted_test(hoda_test):
    return fit_in_box(hoda_test, 32, 0.8)


def _reference_decode(buf: bytes, count: int) -> list[tuple[int, np.ndarray]]:
    """The format's definition, one run at a time (slow; for a few hundred records)."""
    out, pos = [], 1024
    for _ in range(count):
        label, w, h, n = buf[pos + 1], buf[pos + 2], buf[pos + 3], struct.unpack_from("<H", buf, pos + 4)[0]
        pos += 6
        img, k = np.zeros((h, w), np.uint8), pos
        for y in range(h):
            x, ink = 0, False
            while x < w:
                r = buf[k]
                k += 1
                if ink:
                    img[y, x : x + r] = 255
                x, ink = x + r, not ink
        assert k == pos + n
        pos += n
        out.append((label, img))
    return out


def _record_starts(buf: bytes, count: int) -> list[int]:
    starts, pos = [], 1024
    for _ in range(count):
        starts.append(pos)
        pos += 6 + struct.unpack_from("<H", buf, pos + 4)[0]
    return starts + [pos]


def test_counts_histograms_and_header(hoda_test, hoda_remaining):
    assert len(hoda_test) == 20000 and np.bincount(hoda_test.labels).tolist() == [2000] * 10
    assert len(hoda_remaining) == 22352 and np.bincount(hoda_remaining.labels).tolist() == REMAINING_HIST
    assert hoda_test.header.year == 2005 and hoda_test.header.image_type == 0
    assert hoda_remaining.header.comment == "Remaining Samples (Randomized)"
    for r in (hoda_test, hoda_remaining):
        assert 3 <= r.widths.min() and r.widths.max() <= 54 and 4 <= r.heights.min() and r.heights.max() <= 64
        assert r.pixels.dtype == np.uint8 and set(np.unique(r.pixels).tolist()) == {0, 255}


def test_known_records(hoda_test, hoda_remaining):
    img = hoda_test.image(0)  # a "0", 16x16
    assert hoda_test.labels[0] == 0 and img.shape == (16, 16) and int(img.sum()) // 255 == 159
    assert _sha(img) == "9ff5bc451359ad85ea316c3ae093cf7aa3e1da922bd5fcbfef43024313dc05ef"
    img = hoda_remaining.image(0)  # a "4", 38x20
    assert hoda_remaining.labels[0] == 4 and img.shape == (38, 20) and int(img.sum()) // 255 == 266
    assert _sha(img) == "b537f5a315116f590b030689608b607e574f7710a25f9d0099ee9b4381b64a5f"
    img = hoda_test.image(12345)
    assert hoda_test.labels[12345] == 6 and img.shape == (38, 23)
    assert _sha(img) == "9e5346d8024824414c7f3562c5b1af1d8e9c945d1d97424d89778050ca02dea7"
    # structure: scans are cropped to the digit (ink on all four borders), about a third of pixels are ink
    for r in (hoda_test, hoda_remaining):
        assert abs((r.pixels > 0).mean() - 0.33) < 0.01
        for i in range(0, len(r), 997):
            im = r.image(i) > 0
            assert im[0].any() and im[-1].any() and im[:, 0].any() and im[:, -1].any()


def test_vectorised_decoder_matches_the_definition(shared_data, hoda_test, hoda_remaining):
    for name, records in ((TEST, hoda_test), (REMAINING, hoda_remaining)):
        buf = (shared_data / "hoda" / name).read_bytes()
        for i, (label, img) in enumerate(_reference_decode(buf, 300)):
            assert records.labels[i] == label and np.array_equal(records.image(i), img)


def test_fit_in_box_centres_bright_digits(hoda_test, fitted_test):
    x = fitted_test
    assert x.shape == (20000, 1, 32, 32) and x.dtype == torch.uint8
    assert abs(int(x[0].sum()) / 107485 - 1) < 0.02
    assert 0.15 < (x > 127).float().mean().item() < 0.19
    corners = torch.cat([x[:, 0, :3, :3].flatten(), x[:, 0, -3:, -3:].flatten()])
    assert corners.max() == 0  # dark background
    for i in range(0, 20000, 499):
        ys, xs = torch.nonzero(x[i, 0] > 0, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert max(h, w) in (26, 27)  # the longer side fills the 0.8 * 32 box (+1 for antialiasing)
        assert abs((ys.max() + ys.min()) / 2 - 15.5) <= 1 and abs((xs.max() + xs.min()) / 2 - 15.5) <= 1
        ratio = hoda_test.heights[i] / hoda_test.widths[i]
        assert abs(np.log(h / w) - np.log(ratio)) < 0.35  # aspect ratio kept (up to pixel rounding)


def test_datamodule_offline_auto_split(shared_data, tmp_path_factory, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network request attempted"))
    cache = tmp_path_factory.mktemp("hoda_cache")
    dm = DiffusionDataModule(name="persian", root=shared_data / "hoda", download=True, cache_dir=cache)
    assert (dm.image_size, dm.channels, dm.num_classes) == (32, 1, 10)
    assert not list(cache.iterdir())  # nothing loaded by construction
    dm.prepare_data()
    dm.setup()
    assert dm.plan() == ("remaining", "test")
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 22352 and len(dm.dataset("test")) == 20000
    x, y = dm.real_images("test")
    assert x.shape == (20000, 1, 32, 32) and torch.bincount(y).tolist() == [2000] * 10
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.dtype == torch.float32 and -1 <= xb.min() < xb.max() <= 1 and yb.dtype == torch.int64


def test_missing_files_message(tmp_path):
    dm = DiffusionDataModule(
        name="persian", root=tmp_path / "nowhere", download=False, cache_dir=tmp_path / "c"
    )
    with pytest.raises(MissingDataError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "\n" not in msg and "'persian'" in msg and str(tmp_path / "nowhere") in msg
    assert (
        "Train 60000.cdb" in msg
        and "Test 20000.cdb" in msg
        and "dataset.download=true" in msg
        and "dataset.root=" in msg
    )
    assert "RemainingSamples.cdb" in msg  # the offline alternative


def test_cache_is_loaded_not_decoded_and_rebuilt_when_the_source_changes(shared_data, tmp_path, monkeypatch):
    root, cache = tmp_path / "hoda", tmp_path / "cache"
    root.mkdir()
    shutil.copy(shared_data / "hoda" / TEST, root / TEST)
    dm = DiffusionDataModule(name="persian", root=root, split="test", cache_dir=cache, download=False)
    dm.prepare_data()
    first = dm.real_images("train")

    def boom(*a, **k):
        raise AssertionError("decoded again instead of loading the cache")

    with monkeypatch.context() as m:
        m.setattr(PersianSource, "decode", boom)
        dm2 = DiffusionDataModule(name="persian", root=root, split="test", cache_dir=cache, download=False)
        dm2.setup("fit")
        again = dm2.real_images("train")
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])

    # change the source (header comment): a new entry is built from the new bytes
    buf = bytearray((root / TEST).read_bytes())
    buf[523:530] = b"changed"
    (root / TEST).write_bytes(bytes(buf))
    dm3 = DiffusionDataModule(name="persian", root=root, split="test", cache_dir=cache, download=False)
    assert dm3.load_part("test")["meta"]["comment"].startswith("changed")
    assert len(list(cache.glob("*.pt"))) == 2 and not list(cache.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------
# Corrupt files, built from the first records of the real Test file
# ---------------------------------------------------------------------------------------------------------

N_SMALL = 50


@pytest.fixture(scope="module")
def small_cdb(shared_data):
    """(bytes of a valid 50-record CDB, record start offsets) cut from the real Test file."""
    buf = (shared_data / "hoda" / TEST).read_bytes()
    starts = _record_starts(buf, N_SMALL)
    head = bytearray(buf[:1024])
    struct.pack_into("<I", head, 6, N_SMALL)
    labels = [buf[s + 1] for s in starts[:-1]]
    struct.pack_into("<128I", head, 10, *np.bincount(labels, minlength=128).tolist())
    return bytes(head) + buf[1024 : starts[-1]], starts


def _corrupt(small_cdb, case: str) -> bytes:
    good, starts = small_cdb
    b = bytearray(good)
    if case == "marker":
        b[starts[7]] = 0xFE
    elif case == "overflow":
        w = b[starts[3] + 2]
        b[starts[3] + 6] += w  # the first background run of row 0 now passes the width
    elif case == "bytecount":
        s = starts[5]
        n = struct.unpack_from("<H", b, s + 4)[0]
        struct.pack_into("<H", b, s + 4, n + 1)
        b.insert(s + 6 + n, 0)  # one extra run byte after the image is complete
    elif case == "short_runs":
        s = starts[5]
        n = struct.unpack_from("<H", b, s + 4)[0]
        struct.pack_into("<H", b, s + 4, n - 3)
        del b[s + 6 + n - 3 : s + 6 + n]  # the last row is cut short
    elif case == "truncated":
        b = b[: starts[10] + 9]
    elif case == "extra_records":
        struct.pack_into("<I", b, 6, N_SMALL - 1)
    elif case == "label_counts":
        b[starts[2] + 1] = 9 if b[starts[2] + 1] != 9 else 8
    elif case == "header":
        b = b[:500]
    return bytes(b)


@pytest.mark.parametrize(
    "case, match",
    [
        ("marker", "record 7 at byte .* has marker 0xfe"),
        ("overflow", "record 3: runs overflow the width .* in row 0"),
        ("bytecount", "record 5: byte count .* does not match"),
        ("short_runs", "record 5: byte count .* does not match"),
        ("truncated", "truncated in record 10"),
        ("extra_records", "record count mismatch"),
        ("label_counts", "label counts disagree with the header"),
        ("header", "truncated header"),
    ],
)
def test_corrupt_cdb_is_refused(small_cdb, tmp_path, case, match):
    path = tmp_path / "bad.cdb"
    path.write_bytes(_corrupt(small_cdb, case))
    with pytest.raises(CorruptDataError, match=match) as e:
        read_cdb(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_small_cdb_is_valid_and_count_is_checked(small_cdb, tmp_path, hoda_test):
    path = tmp_path / "ok.cdb"
    path.write_bytes(small_cdb[0])
    r = read_cdb(path)
    assert len(r) == N_SMALL and np.array_equal(r.pixels, hoda_test.pixels[: len(r.pixels)])
    with pytest.raises(CorruptDataError, match="record count mismatch: header announces 50, expected 20000"):
        read_cdb(path, expected_records=20000)


def test_corrupt_file_through_the_datamodule(shared_data, tmp_path):
    root = tmp_path / "hoda"
    root.mkdir()
    buf = bytearray((shared_data / "hoda" / TEST).read_bytes())
    s = _record_starts(bytes(buf), 20000)[19997]
    buf[s + 6] += buf[s + 2]  # record 19997: the first run of row 0 passes the width
    (root / TEST).write_bytes(bytes(buf))
    dm = DiffusionDataModule(name="persian", root=root, split="test", cache_dir=tmp_path / "c")
    with pytest.raises(CorruptDataError, match="record 19997: runs overflow"):
        dm.prepare_data()
    assert not list((tmp_path / "c").glob("*.pt"))


def test_grey_cdb(small_cdb, tmp_path, hoda_test):
    """Type-1 (grey) files store width*height bytes per record, column-major."""
    good, starts = small_cdb
    out = bytearray(good[:1024])
    out[522] = 1
    for i in range(N_SMALL):
        img = hoda_test.image(i)
        h, w = img.shape
        out += bytes([0xFF, hoda_test.labels[i], w, h]) + struct.pack("<H", h * w) + img.T.tobytes()
    path = tmp_path / "grey.cdb"
    path.write_bytes(bytes(out))
    r = read_cdb(path)
    assert all(np.array_equal(r.image(i), hoda_test.image(i)) for i in range(N_SMALL))
