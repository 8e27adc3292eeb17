"""The decoded-dataset cache: fast reloads, keys, rebuilds on change, concurrent writers, bad entries."""

from __future__ import annotations

import gzip
import shutil
import threading

import pytest
import torch

from diffusion_lab.data import DiffusionDataModule
from diffusion_lab.data.cache import default_cache_dir, load_or_build
from diffusion_lab.data.mnist import MnistSource

FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def mnist_root(shared_data, tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    for f in FILES:
        shutil.copy(shared_data / "mnist" / f, root / f)
    return root


def _dm(root, cache, **kw):
    return DiffusionDataModule(name="mnist", root=root, split="test", download=False, cache_dir=cache, **kw)


def _count_decodes(monkeypatch) -> list[int]:
    calls = []
    original = MnistSource.decode

    def counted(self, part):
        calls.append(1)
        return original(self, part)

    monkeypatch.setattr(MnistSource, "decode", counted)
    return calls


def test_second_load_skips_decoding(mnist_root, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    cache = tmp_path / "cache"
    _dm(mnist_root, cache).prepare_data()
    dm = _dm(mnist_root, cache)
    dm.setup()
    x, y = dm.real_images("train")
    assert len(calls) == 1, "the second data module loads the cached entry, the decoder is not called again"
    assert x.shape == (9500, 1, 28, 28)
    entries = list(cache.glob("*.pt"))
    assert len(entries) == 1 and entries[0].name.startswith("mnist-test-28px-1ch-")


def test_key_covers_size_channels_and_source(mnist_root, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    cache = tmp_path / "cache"
    _dm(mnist_root, cache).prepare_data()
    _dm(mnist_root, cache, image_size=32).prepare_data()
    _dm(mnist_root, cache, channels=3).prepare_data()
    assert len(calls) == 3 and len(list(cache.glob("*.pt"))) == 3
    # change one label in the source: a new entry holds the new label
    raw = bytearray(gzip.decompress((mnist_root / FILES[1]).read_bytes()))
    raw[8] = 3  # record 0 was a 7
    (mnist_root / FILES[1]).write_bytes(gzip.compress(bytes(raw), compresslevel=1))
    dm = _dm(mnist_root, cache)
    assert int(dm.load_part("test")["labels"][0]) == 3 and len(calls) == 4


def test_concurrent_writers_build_once(mnist_root, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    cache = tmp_path / "cache"
    errors, results = [], []

    def job():
        try:
            dm = _dm(mnist_root, cache)
            dm.prepare_data()
            results.append(dm.load_part("test")["labels"].sum().item())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=job) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(results) == 4
    assert len(calls) == 1
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.tmp"))


def test_unreadable_entry_is_rebuilt(tmp_path):
    path = tmp_path / "entry.pt"
    path.write_bytes(b"half a file")
    entry = load_or_build(
        path, lambda: {"images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8), "labels": torch.zeros(2)}
    )
    assert entry["images"].shape == (2, 1, 4, 4)
    assert torch.load(path, weights_only=True)["images"].shape == (2, 1, 4, 4)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DIFFUSION_LAB_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "diffusion_lab")


def _entry(n: int = 4) -> dict:
    return {
        "images": torch.arange(n * 16, dtype=torch.uint8).reshape(n, 1, 4, 4),
        "labels": torch.arange(n, dtype=torch.int64) % 3,
        "meta": {},
    }


@pytest.mark.parametrize("corrupt", ["inverted pixels", "changed label"])
def test_corrupt_entry_fails_its_checksum_and_is_rebuilt(tmp_path, caplog, corrupt):
    path = tmp_path / "entry.pt"
    builds = []
    build = lambda: builds.append(1) or _entry()  # noqa: E731
    load_or_build(path, build)
    stored = torch.load(path, weights_only=True)
    if corrupt == "inverted pixels":
        stored["images"] = 255 - stored["images"]
    else:
        stored["labels"][0] = 99
    torch.save(stored, path)  # the old checksum stays
    with caplog.at_level("WARNING", logger="diffusion_lab.data.cache"):
        entry = load_or_build(path, build)
    assert len(builds) == 2, "the corrupt entry is not trusted: the decoder runs again"
    assert torch.equal(entry["images"], _entry()["images"]) and torch.equal(
        entry["labels"], _entry()["labels"]
    )
    assert torch.equal(torch.load(path, weights_only=True)["images"], _entry()["images"]), "rewritten on disk"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "failed its checksum" in warnings[0] and str(path) in warnings[0]


def test_full_disk_warns_once_and_keeps_the_data_in_memory(tmp_path, monkeypatch, caplog):
    import errno

    from diffusion_lab.data import cache
    from diffusion_lab.utils.fileio import DiskFullError

    def full(path, write_fn, measure=True):
        raise DiskFullError(errno.ENOSPC, f"no space left on device writing {path}")

    monkeypatch.setattr(cache, "atomic_write", full)
    monkeypatch.setattr(cache, "_warned", set())
    with caplog.at_level("WARNING", logger="diffusion_lab.data.cache"):
        a = load_or_build(tmp_path / "a.pt", _entry)
        b = load_or_build(tmp_path / "b.pt", _entry)
    assert torch.equal(a["images"], _entry()["images"]) and torch.equal(b["labels"], _entry()["labels"])
    assert not list(tmp_path.glob("*.pt"))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no space left on device" in warnings[0] and "in memory" in warnings[0]


def test_partial_file_of_a_killed_writer_is_removed_and_entries_follow_the_umask(tmp_path):
    import os

    path = tmp_path / "entry.pt"
    stale = tmp_path / ".entry.pt.1a2b3c4d.tmp"  # what atomic_write leaves when killed mid-write
    stale.write_bytes(b"half")
    old = os.umask(0o002)
    try:
        load_or_build(path, _entry)
    finally:
        os.umask(old)
    assert not stale.exists()
    assert (path.stat().st_mode & 0o777) == 0o664, "group-writable like any file made under umask 002"
