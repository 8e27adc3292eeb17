"""The decoded-dataset cache: fast reloads, keys, rebuilds on change, concurrent writers, bad entries."""

from __future__ import annotations

import gzip
import shutil
import threading
import time

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


def test_second_load_is_fast_and_skips_decoding(mnist_root, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    cache = tmp_path / "cache"
    _dm(mnist_root, cache).prepare_data()
    t = time.perf_counter()
    dm = _dm(mnist_root, cache)
    dm.setup()
    x, y = dm.real_images("train")
    elapsed = time.perf_counter() - t
    assert len(calls) == 1 and elapsed < 1.0 and x.shape == (9500, 1, 28, 28)
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
