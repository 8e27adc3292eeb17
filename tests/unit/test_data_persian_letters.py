"""Hoda Persian letters: the CDB 5.0 decoder on the real file, the stratified holdout, the DataModule, the
verified download from a local server, and corrupt files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import socket
import struct
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion_lab.data import CorruptDataError, DiffusionDataModule, MissingDataError, read_cdb
from diffusion_lab.data.cdb import CDB5_FORMAT, DIGITS_FORMAT, fit_in_box
from diffusion_lab.data.download import file_md5
from diffusion_lab.data.persian_letters import (
    CLASS_LETTERS,
    CLASS_NAMES,
    LETTERS_TEST_COUNTS,
    LETTERS_TEST_FILE,
    LETTERS_TEST_MD5,
    PersianLettersSource,
    stratified_split,
)

HEAD = struct.Struct("<HHHHHI")  # marker, label, confidence, width, height, byte count
HEADER = 1280  # 1024 + 4 * 64 label slots
CONF = Path(__file__).resolve().parents[2] / "conf"


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="session")
def letters_file(shared_data):
    path = shared_data / "hoda_letters" / LETTERS_TEST_FILE
    if not path.is_file():
        msg = f"Hoda letters file not found at {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must have it")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def letters(letters_file):
    return read_cdb(letters_file)


@pytest.fixture(scope="session")
def fitted(letters):
    return fit_in_box(letters, 32, 0.8)


def _record_starts(buf: bytes, count: int) -> list[int]:
    starts, pos = [], HEADER
    for _ in range(count):
        starts.append(pos)
        pos += HEAD.size + HEAD.unpack_from(buf, pos)[-1]
    return starts + [pos]


def _reference_decode(buf: bytes, starts: list[int]) -> list[tuple[int, np.ndarray]]:
    """The format's definition, one run at a time (slow; for a few hundred records)."""
    out = []
    for pos in starts:
        _, label, _, w, h, n = HEAD.unpack_from(buf, pos)
        img, k = np.zeros((h, w), np.uint8), pos + HEAD.size
        for y in range(h):
            x, ink = 0, False
            while x < w:
                r = buf[k]
                k += 1
                if ink:
                    img[y, x : x + r] = 255
                x, ink = x + r, not ink
        assert k == pos + HEAD.size + n
        out.append((label, img))
    return out


# ---------------------------------------------------------------------------------------------------------
# The real file
# ---------------------------------------------------------------------------------------------------------


def test_header_counts_and_sizes(letters, letters_file):
    h = letters.header
    assert (h.format, h.size, h.year, h.month, h.day, h.width, h.height) == (
        CDB5_FORMAT,
        HEADER,
        2010,
        10,
        29,
        0,
        0,
    )
    assert (
        len(h.label_counts) == 64
        and h.label_counts[:36] == LETTERS_TEST_COUNTS
        and not any(h.label_counts[36:])
    )
    assert h.comment.startswith("Persian Character Dataset\r\nTest Subset")
    assert len(letters) == 17706 and tuple(np.bincount(letters.labels).tolist()) == LETTERS_TEST_COUNTS
    assert (letters.widths.min(), letters.widths.max(), letters.heights.min(), letters.heights.max()) == (
        3,
        87,
        9,
        73,
    )
    assert set(np.unique(letters.pixels).tolist()) == {0, 255}
    assert file_md5(letters_file) == LETTERS_TEST_MD5


def test_known_records(letters):
    img = letters.image(0)  # an alef, 31 rows of 6
    assert letters.labels[0] == 0 and img.shape == (31, 6) and int(img.sum()) // 255 == 129
    assert _sha(img) == "55343fc2f8863fc9c640d415a217430e5232737ae64012b0b30ff90f325a8efb"
    img = letters.image(17705)  # the last record, a final he
    assert letters.labels[17705] == 35 and img.shape == (22, 26)
    assert _sha(img) == "dbefd525b149f8adfab5542562bbb76756e4d99784b27f482b90b21659c7a101"
    # scans are cropped to the letter: ink on all four borders; about a quarter of the pixels are ink
    assert abs((letters.pixels > 0).mean() - 0.254) < 0.005
    for i in range(0, len(letters), 499):
        im = letters.image(i) > 0
        assert im[0].any() and im[-1].any() and im[:, 0].any() and im[:, -1].any()


def test_vectorised_decoder_matches_the_definition(letters_file, letters):
    buf = letters_file.read_bytes()
    starts = _record_starts(buf, len(letters))
    picked = list(range(200)) + list(range(len(letters) - 100, len(letters)))
    for i, (label, img) in zip(picked, _reference_decode(buf, [starts[i] for i in picked]), strict=True):
        assert letters.labels[i] == label and np.array_equal(letters.image(i), img)
    assert starts[-1] == len(buf)  # the file ends exactly after the last record


def test_fit_in_box_upright_bright_and_centred(letters, fitted):
    x = fitted
    assert x.shape == (17706, 1, 32, 32) and x.dtype == torch.uint8
    corners = torch.cat([x[:, 0, :3, :3].flatten(), x[:, 0, -3:, -3:].flatten()])
    assert corners.max() == 0  # dark background, bright ink
    assert 0.11 < (x > 127).float().mean().item() < 0.17
    for i in range(0, len(x), 211):
        ys, xs = torch.nonzero(x[i, 0] > 0, as_tuple=True)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert max(h, w) in (26, 27)  # the longer side fills the 0.8 * 32 box (+1 for antialiasing)
        assert abs((ys.max() + ys.min()) / 2 - 15.5) <= 1 and abs((xs.max() + xs.min()) / 2 - 15.5) <= 1
        ratio = letters.heights[i] / letters.widths[i]
        if min(h, w) > 3:  # aspect ratio kept (up to pixel rounding)
            assert abs(np.log(h / w) - np.log(ratio)) < 0.35
    # neither mirrored nor flipped: the scan's top row lands at the top, its right column at the right
    mirrored = 0
    for i in range(0, 2000, 97):
        src = torch.from_numpy(letters.image(i)).float()[None, None]
        h, w = src.shape[-2:]
        nh, nw = max(1, round(h * 26 / max(h, w))), max(1, round(w * 26 / max(h, w)))
        ref = torch.nn.functional.interpolate(src, size=(nh, nw), mode="bilinear", antialias=True)[0, 0]
        top, left = (32 - nh) // 2, (32 - nw) // 2
        got = x[i, 0, top : top + nh, left : left + nw].float()
        assert (got - ref).abs().max() <= 1
        mirrored += int((got - ref.flip(-1)).abs().max() <= 1) + int((got - ref.flip(-2)).abs().max() <= 1)
    assert mirrored <= 2  # (a rare symmetric scan may equal its mirror image)


def test_class_names_match_the_label_order():
    assert len(CLASS_NAMES) == len(CLASS_LETTERS) == 36 and len(set(CLASS_NAMES)) == 36
    assert (CLASS_NAMES[0], CLASS_NAMES[31], CLASS_NAMES[32], CLASS_NAMES[33]) == (
        "alef",
        "ye",
        "hamze",
        "alef_madda",
    )
    assert (CLASS_NAMES[34], CLASS_NAMES[35]) == ("he_medial", "he_final")
    assert all(n.isascii() and n.isidentifier() for n in CLASS_NAMES)
    assert CLASS_LETTERS[:4] == ("\u0627", "\u0628", "\u067e", "\u062a") and CLASS_LETTERS[33] == "\u0622"


# ---------------------------------------------------------------------------------------------------------
# The stratified holdout
# ---------------------------------------------------------------------------------------------------------


def test_stratified_split_is_fixed_disjoint_and_per_class():
    labels = np.repeat(np.arange(5), [10, 3, 2, 1, 40])
    train, test = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert not set(train) & set(test)
    assert np.bincount(labels[test], minlength=5).tolist() == [
        2,
        1,
        1,
        0,
        8,
    ]  # >= 1, < n_c, a 1-row class trains
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again[1], test) and not np.array_equal(
        stratified_split(labels, 0.2, seed=1)[1], test
    )
    with pytest.raises(ValueError, match="test_fraction must lie in"):
        stratified_split(labels, 1.0, seed=0)


def test_datamodule_offline_holdout(letters_file, letters, fitted, tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network request attempted"))
    cache = tmp_path / "cache"
    dm = DiffusionDataModule(name="persian_letters", root=letters_file.parent, download=True, cache_dir=cache)
    assert (dm.image_size, dm.channels, dm.num_classes, dm.hflip) == (32, 1, 36, False)
    assert dm.class_names == list(CLASS_NAMES) and not cache.exists()  # nothing loaded by construction
    dm.prepare_data()
    dm.setup()
    assert dm.plan() == ("holdout_train", "holdout_test")
    n_fit, n_test = len(dm.dataset("train")) + len(dm.dataset("val")), len(dm.dataset("test"))
    assert (n_fit, n_test) == (14164, 3542)
    test_hist = torch.bincount(dm.real_images("test")[1], minlength=36).numpy()
    assert np.abs(test_hist - 0.2 * np.asarray(LETTERS_TEST_COUNTS)).max() <= 0.5  # stratified
    # the two parts are the seeded split of the one file, disjoint, and together the whole file
    train_rows, test_rows = stratified_split(letters.labels, 0.2, 0)
    assert torch.equal(dm.load_part("holdout_test")["images"], fitted[torch.from_numpy(test_rows)])
    assert torch.equal(dm.load_part("holdout_train")["images"], fitted[torch.from_numpy(train_rows)])
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.dtype == torch.float32 and -1 <= xb.min() < xb.max() <= 1 and yb.max() < 36


def test_config_instantiates(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            overrides=["+paths=default", "+dataset=persian_letters", f"dataset.cache_dir={tmp_path}"]
        )
    dm = instantiate(cfg.dataset)
    assert (dm.name, dm.image_size, dm.channels, dm.num_classes, dm.hflip) == (
        "persian_letters",
        32,
        1,
        36,
        False,
    )
    assert dm.source.options() == {"box_fraction": 0.8, "test_fraction": 0.2, "seed": 0}


def test_missing_file_messages_and_auto_split(letters_file, tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network request attempted"))
    root = tmp_path / "letters"
    dm = DiffusionDataModule(name="persian_letters", root=root, download=False, cache_dir=tmp_path / "c")
    with pytest.raises(MissingDataError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert "\n" not in msg and "'persian_letters'" in msg and LETTERS_TEST_FILE in msg and str(root) in msg
    assert "dataset.download=true" in msg and "dataset.root=" in msg
    root.mkdir()
    shutil.copy(letters_file, root / LETTERS_TEST_FILE)
    dm = DiffusionDataModule(
        name="persian_letters", root=root, split="train", download=True, cache_dir=tmp_path / "c"
    )
    with pytest.raises(RuntimeError, match="no public source of 'Persian-Character-DB-Training.cdb'") as e:
        dm.prepare_data()
    assert "dataset.split=holdout" in str(e.value) and "\n" not in str(e.value)
    # with a training file placed by hand, auto trains on it and evaluates on the whole published file
    src = PersianLettersSource(root=root)
    assert src.plan("auto") == ("holdout_train", "holdout_test")
    shutil.copy(letters_file, root / "Persian-Character-DB-Training.cdb")
    assert src.plan("auto") == ("train", "test") and src.plan("holdout") == ("holdout_train", "holdout_test")
    with pytest.raises(ValueError, match="test_fraction must lie in"):
        PersianLettersSource(root=root, test_fraction=0)


# ---------------------------------------------------------------------------------------------------------
# Download from a local server
# ---------------------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(monkeypatch):
    """serve(folder) -> base URL of a threaded HTTP server on 127.0.0.1 serving that folder."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(folder) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_download_is_md5_verified_and_used(letters_file, tmp_path, serve):
    with socket.socket() as s:  # a port nothing listens on: the first mirror refuses the connection
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    served = tmp_path / "Dataset"
    served.mkdir()
    shutil.copy(letters_file, served / LETTERS_TEST_FILE)
    root = tmp_path / "data" / "hoda_letters"
    dm = DiffusionDataModule(
        name="persian_letters",
        root=root,
        download=True,
        mirrors=[dead, serve(served)],
        cache_dir=tmp_path / "c",
    )
    dm.prepare_data()
    assert os.listdir(root) == [LETTERS_TEST_FILE] and file_md5(root / LETTERS_TEST_FILE) == LETTERS_TEST_MD5
    assert len(dm.real_images("test")[0]) == 3542


def test_corrupt_download_is_refused_without_leftovers(letters_file, tmp_path, serve):
    served = tmp_path / "Dataset"
    served.mkdir()
    data = bytearray(letters_file.read_bytes())
    data[100_000] ^= 0x01
    (served / LETTERS_TEST_FILE).write_bytes(bytes(data))
    root = tmp_path / "data"
    src = PersianLettersSource(root=root, download=True, mirrors=[serve(served)])
    with pytest.raises(
        RuntimeError, match=f"{LETTERS_TEST_FILE}.*checksum mismatch.*no partial file was kept"
    ):
        src.fetch("holdout_train")
    assert os.listdir(root) == []


# ---------------------------------------------------------------------------------------------------------
# Corrupt files, built from the first records of the real file
# ---------------------------------------------------------------------------------------------------------

N_SMALL = 50


@pytest.fixture(scope="session")
def small_cdb(letters_file):
    """(bytes of a valid 50-record CDB 5.0 file, record start offsets) cut from the real file."""
    buf = letters_file.read_bytes()
    starts = _record_starts(buf, N_SMALL)
    head = bytearray(buf[:HEADER])
    struct.pack_into("<I", head, 15, N_SMALL)
    labels = [HEAD.unpack_from(buf, s)[1] for s in starts[:-1]]
    struct.pack_into("<64I", head, 21, *np.bincount(labels, minlength=64).tolist())
    return bytes(head) + buf[HEADER : starts[-1]], starts


def _corrupt(small_cdb, case: str) -> bytes:
    good, starts = small_cdb
    b = bytearray(good)
    if case == "magic":
        b[0:3] = b"CBD"
    elif case == "marker":
        b[starts[7] + 1] = 0xFE  # marker 0xfeff
    elif case == "overflow":
        w = HEAD.unpack_from(b, starts[3])[3]
        b[starts[3] + HEAD.size] += w  # the first background run of row 0 now passes the width
    elif case == "bytecount":
        s = starts[5]
        n = HEAD.unpack_from(b, s)[-1]
        struct.pack_into("<I", b, s + 10, n + 1)
        b.insert(s + HEAD.size + n, 0)  # one extra run byte after the image is complete
    elif case == "short_runs":
        s = starts[5]
        n = HEAD.unpack_from(b, s)[-1]
        struct.pack_into("<I", b, s + 10, n - 2)
        del b[s + HEAD.size + n - 2 : s + HEAD.size + n]  # the last row is cut short
    elif case == "truncated":
        b = b[: starts[10] + 20]
    elif case == "truncated_head":
        b = b[: starts[12] + 5]
    elif case == "extra_records":
        struct.pack_into("<I", b, 15, N_SMALL - 1)
    elif case == "label_counts":
        s = starts[2]
        struct.pack_into("<H", b, s + 2, 9 if HEAD.unpack_from(b, s)[1] != 9 else 8)
    elif case == "label_slots":
        struct.pack_into("<H", b, starts[4] + 2, 64)  # the header has 64 label slots: 0-63
    elif case == "image_type":
        b[21 + 4 * 64] = 7
    elif case == "header":
        b = b[:900]
    return bytes(b)


@pytest.mark.parametrize(
    "case, match",
    [
        ("magic", "bad header, starts with b'CBD 5.0' instead of the magic 'CDB 5.0'"),
        ("marker", "record 7 at byte .* has marker 0xfeff, expected 0xffff"),
        ("overflow", "record 3: runs overflow the width .* in row 0"),
        ("bytecount", "record 5: byte count .* does not match"),
        ("short_runs", "record 5: byte count .* does not match"),
        ("truncated", "truncated in record 10"),
        ("truncated_head", "truncated at record 12"),
        ("extra_records", "record count mismatch: .* bytes follow the 49 records"),
        ("label_counts", "label counts disagree with the header"),
        ("label_slots", "record 4 has label 64, outside the header's 64 label slots"),
        ("image_type", "unknown image type 7"),
        ("header", "truncated header \\(900 of 1280 bytes"),
    ],
)
def test_corrupt_cdb5_is_refused(small_cdb, tmp_path, case, match):
    path = tmp_path / "bad.cdb"
    path.write_bytes(_corrupt(small_cdb, case))
    with pytest.raises(CorruptDataError, match=match) as e:
        read_cdb(path, fmt=CDB5_FORMAT)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_small_cdb5_is_valid_and_formats_are_not_mixed(small_cdb, tmp_path, letters):
    path = tmp_path / "ok.cdb"
    path.write_bytes(small_cdb[0])
    r = read_cdb(path)  # the format is detected by the magic
    assert r.header.format == CDB5_FORMAT and len(r) == N_SMALL
    assert np.array_equal(r.pixels, letters.pixels[: len(r.pixels)])
    with pytest.raises(CorruptDataError, match="a CDB 5.0 file .* dataset=persian_letters"):
        read_cdb(path, fmt=DIGITS_FORMAT)
    with pytest.raises(CorruptDataError, match="record count mismatch: header announces 50, expected 17706"):
        read_cdb(path, expected_records=17706)


def test_wrong_counts_of_the_published_file(small_cdb, letters_file, tmp_path):
    """A well-formed file under the published name with other counts is refused, not silently used."""
    root = tmp_path / "letters"
    root.mkdir()
    (root / LETTERS_TEST_FILE).write_bytes(small_cdb[0])
    dm = DiffusionDataModule(name="persian_letters", root=root, cache_dir=tmp_path / "c")
    with pytest.raises(CorruptDataError, match="record count mismatch: 50 records, expected 17706"):
        dm.prepare_data()
    # the full count, one record moved from class 0 to class 1 (header counts consistent)
    buf = bytearray(letters_file.read_bytes())
    struct.pack_into("<H", buf, HEADER + 2, 1)
    struct.pack_into("<2I", buf, 21, LETTERS_TEST_COUNTS[0] - 1, LETTERS_TEST_COUNTS[1] + 1)
    (root / LETTERS_TEST_FILE).write_bytes(bytes(buf))
    dm = DiffusionDataModule(name="persian_letters", root=root, cache_dir=tmp_path / "c")
    with pytest.raises(
        CorruptDataError, match="per-class counts differ .*class 0: 519 records, expected 520"
    ):
        dm.prepare_data()
    assert not list((tmp_path / "c").glob("*.pt"))


def test_corrupt_record_through_the_datamodule(letters_file, tmp_path):
    root = tmp_path / "letters"
    root.mkdir()
    buf = bytearray(letters_file.read_bytes())
    s = _record_starts(bytes(buf), 17001)[17000]
    buf[s + HEAD.size] += HEAD.unpack_from(buf, s)[3]  # record 17000: the first run of row 0 passes the width
    (root / LETTERS_TEST_FILE).write_bytes(bytes(buf))
    dm = DiffusionDataModule(name="persian_letters", root=root, cache_dir=tmp_path / "c")
    with pytest.raises(CorruptDataError, match="record 17000: runs overflow") as e:
        dm.prepare_data()
    assert LETTERS_TEST_FILE in str(e.value)
    assert not list((tmp_path / "c").glob("*.pt"))


def test_grey_cdb5(small_cdb, tmp_path, letters):
    """Type-1 (grey) files store width*height bytes per record, column-major, as in the digits' format."""
    good, _ = small_cdb
    out = bytearray(good[:HEADER])
    out[21 + 4 * 64] = 1
    for i in range(N_SMALL):
        img = letters.image(i)
        h, w = img.shape
        out += HEAD.pack(0xFFFF, letters.labels[i], 0, w, h, h * w) + img.T.tobytes()
    path = tmp_path / "grey.cdb"
    path.write_bytes(bytes(out))
    r = read_cdb(path, fmt=CDB5_FORMAT)
    assert all(np.array_equal(r.image(i), letters.image(i)) for i in range(N_SMALL))
