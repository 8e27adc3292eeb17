"""Real downloads from a local HTTP server: md5-verified MNIST, Hoda (spaces in names), corrupt copies."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading

import numpy as np
import pytest

from diffusion_lab.data import DiffusionDataModule
from diffusion_lab.data.download import download_file, file_md5
from diffusion_lab.data.mnist import MNIST_MD5
from diffusion_lab.data.persian import HODA_FILES, PersianSource

MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
HODA_TEST, HODA_REMAINING = HODA_FILES["test"][0], HODA_FILES["remaining"][0]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path, monkeypatch):
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


@pytest.fixture
def dead_url() -> str:
    """A URL on a port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _leftovers(folder):
    return [p.name for p in folder.iterdir()] if folder.exists() else []


def test_mnist_download_is_md5_verified_and_used(shared_data, tmp_path, serve, dead_url):
    served = tmp_path / "served"
    served.mkdir()
    for f in MNIST_FILES:
        shutil.copy(shared_data / "mnist" / f, served / f)
    root = tmp_path / "data" / "mnist"
    dm = DiffusionDataModule(
        name="mnist",
        root=root,
        split="test",
        download=True,
        mirrors=[dead_url, serve(served)],
        cache_dir=tmp_path / "cache",
    )
    dm.prepare_data()  # the first mirror refuses the connection, the second serves the files
    assert sorted(_leftovers(root)) == sorted(MNIST_FILES)
    assert all(file_md5(root / f) == MNIST_MD5[f] for f in MNIST_FILES)
    dm.setup()
    x, y = dm.real_images("train")
    assert len(x) + len(dm.real_images("val")[0]) == 10000 and x.shape[1:] == (1, 28, 28)


def test_corrupt_mnist_download_is_refused_without_leftovers(shared_data, tmp_path, serve):
    served = tmp_path / "served"
    served.mkdir()
    data = bytearray((shared_data / "mnist" / MNIST_FILES[0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (served / MNIST_FILES[0]).write_bytes(bytes(data))
    shutil.copy(shared_data / "mnist" / MNIST_FILES[1], served / MNIST_FILES[1])
    root = tmp_path / "data"
    dm = DiffusionDataModule(
        name="mnist",
        root=root,
        split="test",
        download=True,
        mirrors=[serve(served)],
        cache_dir=tmp_path / "c",
    )
    with pytest.raises(RuntimeError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert MNIST_FILES[0] in msg and "checksum mismatch" in msg and "no partial file was kept" in msg
    assert MNIST_FILES[0] not in _leftovers(root) and not [n for n in _leftovers(root) if n.endswith(".tmp")]


def test_missing_file_on_server_is_reported(tmp_path, serve):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="404.*no partial file was kept"):
        download_file([serve(empty) + "nothing.gz"], tmp_path / "out" / "nothing.gz")
    assert _leftovers(tmp_path / "out") == []


def test_hoda_download_with_spaces_md5_and_counts(shared_data, tmp_path, serve):
    served = tmp_path / "DigitDB"
    served.mkdir()
    for f in (HODA_TEST, HODA_REMAINING):
        shutil.copy(shared_data / "hoda" / f, served / f)
    root = tmp_path / "data" / "hoda"
    src = PersianSource(root=root, download=True, mirrors=[serve(served)])
    assert src.plan("auto") == ("train", "test")  # nothing on disk: auto would fetch the training file
    src.fetch("remaining")
    src.fetch("test")
    assert sorted(_leftovers(root)) == sorted([HODA_TEST, HODA_REMAINING])
    for part in ("test", "remaining"):
        name, md5, _, _ = HODA_FILES[part]
        assert file_md5(root / name) == md5
    assert src.plan("auto") == ("remaining", "test")  # now it trains offline on the remaining samples


def test_hoda_download_refuses_wrong_record_count_and_bad_md5(shared_data, tmp_path, serve):
    served = tmp_path / "DigitDB"
    served.mkdir()
    # a "Train 60000.cdb" (no published md5) that holds only 20,000 records: the record count refuses it
    shutil.copy(shared_data / "hoda" / HODA_TEST, served / HODA_FILES["train"][0])
    # a Test file with one flipped byte: the md5 refuses it
    data = bytearray((shared_data / "hoda" / HODA_TEST).read_bytes())
    data[5000] ^= 0x01
    (served / HODA_TEST).write_bytes(bytes(data))
    root = tmp_path / "data"
    src = PersianSource(root=root, download=True, mirrors=[serve(served)])
    with pytest.raises(
        RuntimeError, match="Train 60000.cdb.*record count mismatch.*no partial file was kept"
    ):
        src.fetch("train")
    with pytest.raises(RuntimeError, match="Test 20000.cdb.*checksum mismatch"):
        src.fetch("test")
    assert _leftovers(root) == []


def test_downloaded_hoda_decodes(shared_data, tmp_path, serve):
    served = tmp_path / "DigitDB"
    served.mkdir()
    shutil.copy(shared_data / "hoda" / HODA_TEST, served / HODA_TEST)
    dm = DiffusionDataModule(
        name="persian",
        root=tmp_path / "hoda",
        split="test",
        download=True,
        mirrors=[serve(served)],
        cache_dir=tmp_path / "cache",
    )
    dm.prepare_data()
    _, y = dm.load_part("test")["images"], dm.load_part("test")["labels"]
    assert np.bincount(y.numpy()).tolist() == [2000] * 10
