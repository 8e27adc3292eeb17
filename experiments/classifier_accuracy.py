"""Benchmark: test accuracy and training time of the metrics classifier on MNIST and Hoda.

    python -m experiments.classifier_accuracy [--data ../shared/data] [--epochs 5] [--datasets mnist persian]
        [--save-dir .cache/classifiers]

Splits (the offline copies in ../shared/data hold MNIST's test split only, and Hoda without its 60k file):
  mnist:   the 10k test split, a seeded 8k portion for training, the other 2k for testing;
  persian: Hoda ``RemainingSamples.cdb`` (22,352) for training, ``Test 20000.cdb`` for testing.

Images come from ``DiffusionDataModule.real_images`` when ``diffusion_lab.data`` provides it; otherwise a
minimal reader here (IDX for MNIST; CDB decoded and fitted into 28x28 for Hoda) stands in for the measurement.
The target is > 98 % test accuracy on both.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_lab.metrics.classifier import save_classifier
from diffusion_lab.metrics.train_classifier import train_classifier

REPO = Path(__file__).resolve().parents[1]
DIRS = {"mnist": "mnist", "persian": "hoda"}
# MNIST offline: train on the t10k file with a seeded 20 % (2,000 images) held out as the test set.
SPLIT_OVERRIDES = {
    "mnist": ["dataset.split=test", "dataset.val_fraction=0.2"],
    "persian": ["dataset.split=auto"],
}


# ---------------------------------------------------------------------------------------------------------
# Minimal readers (used only where the DataModule is unavailable)
# ---------------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 0x801:
        return np.frombuffer(data, np.uint8, offset=8)
    raise ValueError(f"{path}: unknown IDX magic {magic:#x}")


def read_cdb(path: Path, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Hoda CDB (binary, variable size) -> uint8 (N, size, size) ink-bright images fitted with aspect kept."""
    data = path.read_bytes()
    total = struct.unpack_from("<I", data, 6)[0]
    fixed_h, fixed_w = data[4], data[5]
    pos, images, labels = 1024, [], []
    for i in range(total):
        if data[pos] != 0xFF:
            raise ValueError(f"{path}: record {i} has a bad start marker")
        label = data[pos + 1]
        pos += 2
        w, h = fixed_w, fixed_h
        if w == 0 or h == 0:
            w, h = data[pos], data[pos + 1]
            pos += 2
        nbytes = struct.unpack_from("<H", data, pos)[0]
        pos += 2
        img = np.zeros((h, w), np.uint8)
        runs = data[pos : pos + nbytes]
        r, k = 0, 0
        while r < h:
            col, ink = 0, False
            while col < w:
                run = runs[k]
                k += 1
                if ink:
                    img[r, col : col + run] = 255
                col += run
                ink = not ink
            r += 1
        pos += nbytes
        images.append(_fit(img, size))
        labels.append(label)
    return np.stack(images), np.asarray(labels, np.int64)


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to fit a (size - 4) box keeping the aspect ratio, centred on a black size x size canvas."""
    h, w = img.shape
    box = size - 4
    s = box / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    t = torch.from_numpy(img).float()[None, None]
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = t.clamp(0, 255).round().byte().numpy()
    return out


def load_direct(name: str, data: Path, seed: int) -> tuple[torch.Tensor, ...]:
    if name == "mnist":
        x = torch.from_numpy(read_idx(data / "mnist" / "t10k-images-idx3-ubyte.gz").copy())[:, None]
        y = torch.from_numpy(read_idx(data / "mnist" / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        tr, te = perm[:8000], perm[8000:]
        return x[tr], y[tr], x[te], y[te]
    if name == "persian":
        xtr, ytr = read_cdb(data / "hoda" / "RemainingSamples.cdb")
        xte, yte = read_cdb(data / "hoda" / "Test 20000.cdb")
        return (
            torch.from_numpy(xtr)[:, None],
            torch.from_numpy(ytr),
            torch.from_numpy(xte)[:, None],
            torch.from_numpy(yte),
        )
    raise ValueError(f"unknown dataset {name}; choose mnist or persian")


def load_datamodule(name: str, data: Path) -> tuple[torch.Tensor, ...] | None:
    """Images through the project's DataModule, or None where diffusion_lab.data does not provide it yet."""
    try:
        from hydra.utils import instantiate

        from diffusion_lab.metrics.train_classifier import compose_config

        cfg = compose_config(
            [
                f"dataset={name}",
                f"dataset.root={data / DIRS[name]}",
                "dataset.download=false",
                *SPLIT_OVERRIDES[name],
            ]
        )
        dm = instantiate(cfg.dataset)
        dm.prepare_data()
        splits = (cfg.metrics.classifier_train_split, cfg.metrics.classifier_test_split)
        (xtr, ytr), (xte, yte) = (dm.real_images(s) for s in splits)
        print(f"{name}: DataModule splits {splits}")
        return xtr, ytr, xte, yte
    except Exception as e:  # noqa: BLE001 - any failure means: measure with the minimal readers instead
        print(f"{name}: DataModule unavailable ({type(e).__name__}: {e}); using the minimal readers here")
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("DIFFUSION_LAB_SHARED_DATA", REPO.parent / "shared" / "data")),
    )
    p.add_argument("--datasets", nargs="+", default=["mnist", "persian"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    p.add_argument("--direct", action="store_true", help="skip the DataModule, use the minimal readers")
    p.add_argument("--save-dir", type=Path, default=None)
    args = p.parse_args()
    for name in args.datasets:
        t0 = time.perf_counter()
        arrays = None if args.direct else load_datamodule(name, args.data)
        arrays = arrays or load_direct(name, args.data, args.seed)
        xtr, ytr, xte, yte = arrays
        load_s = time.perf_counter() - t0
        print(f"{name}: train {tuple(xtr.shape)}, test {tuple(xte.shape)} (loaded in {load_s:.0f} s)")
        model, acc = train_classifier(
            xtr, ytr, xte, yte, epochs=args.epochs, seed=args.seed, dataset=name, num_threads=args.threads
        )
        print(
            f"RESULT {name}: test accuracy {acc:.4f} ({acc * 100:.2f} %), epochs {args.epochs}, "
            f"training {model.config.extra['train_seconds']} s on {args.threads} threads"
        )
        if args.save_dir is not None:
            print("saved", save_classifier(model, args.save_dir / f"{name}.pt"))


if __name__ == "__main__":
    main()
