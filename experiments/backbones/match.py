"""The backbones of the backbone study at matched training FLOPs per image (Hoda digits, 1x32x32).

    python -m experiments.backbones.match                  # the table; fails unless all within 5%
    python -m experiments.backbones.match --overrides NAME # the Hydra overrides of one backbone (for run.sh)

FLOPs are counted by ``torch.utils.flop_counter`` (forward + backward of one image, attention included, a
multiply-add = 2 FLOPs) with ``experiments.bench.setups.flops_per_image``. unet_tiny is the reference; each
DiT's width (and depth) was chosen so that its count lands within a few percent of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiments.bench.setups import CONF, flops_per_image

__all__ = ["BACKBONES", "build", "measure"]

SIZE = 32
TOLERANCE = 0.05  # largest relative gap to the U-Net's training FLOPs per image
# name -> (conf/model file, overrides); the first is the reference
BACKBONES: dict[str, tuple[str, dict]] = {
    "unet_tiny": ("unet_tiny", {}),
    # 64 tokens of 4x4 patches, width 136, 4 blocks of 4 heads: 0.99x the U-Net's FLOPs
    "dit_p4": ("dit_tiny", {"hidden_size": 136}),
    # 256 tokens of 2x2 patches, width 64, 3 blocks of 4 heads: 1.01x
    "dit_p2": ("dit_tiny2", {"hidden_size": 64, "depth": 3}),
}


def build(name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The backbone ``name`` for one-channel 32x32 images, unconditional, as train.py builds it."""
    file, overrides = BACKBONES[name]
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / f"{file}.yaml"), overrides)
    with torch.device(device):
        return instantiate(cfg, in_channels=1, out_channels=1, image_size=SIZE, num_classes=None)


def measure() -> dict[str, dict]:
    """{name: parameters, training GFLOP per image, ratio to the reference}; counted on the meta device."""
    out: dict[str, dict] = {}
    for name in BACKBONES:
        model = build(name, "meta")
        with torch.device("meta"):
            flops = flops_per_image(model, (1, SIZE, SIZE))
        out[name] = {"parameters": sum(p.numel() for p in model.parameters()), "train_gflop": flops / 1e9}
    ref = out[next(iter(BACKBONES))]["train_gflop"]
    for row in out.values():
        row["vs_reference"] = round(row["train_gflop"] / ref, 3)
        row["train_gflop"] = round(row["train_gflop"], 4)
    return out


def hydra_overrides(name: str) -> str:
    file, overrides = BACKBONES[name]
    return " ".join([f"model={file}"] + [f"model.{k}={v}" for k, v in overrides.items()])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overrides", choices=list(BACKBONES), help="print one backbone's Hydra overrides")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.overrides:
        print(hydra_overrides(args.overrides))
        return
    rows = measure()
    for name, row in rows.items():
        print(
            f"{name:<10} {row['parameters']:>10,} parameters  {row['train_gflop']:.4f} GFLOP/image  "
            f"{row['vs_reference']:.3f}x  ({hydra_overrides(name)})"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    off = [n for n, r in rows.items() if abs(r["vs_reference"] - 1) > TOLERANCE]
    if off:
        sys.exit(f"not matched within {TOLERANCE:.0%}: {', '.join(off)}; adjust BACKBONES in match.py")


if __name__ == "__main__":
    main()
