"""Side by side with lucidrains' denoising-diffusion-pytorch (the ``bench`` extra:
``pip install -c constraints.txt -e ".[bench]"``): a U-Net of matched size and FLOPs, the same batch, image
size, threads, schedule (sigmoid) and objective (v), trained and sampled (DDIM, 50 steps) in turn with ours in
the same run."""

from __future__ import annotations

from functools import partial

import torch

from diffusion_lab.samplers import sample
from experiments.bench.setups import autocast, build_unet, flops_per_image, make_diffusion
from experiments.bench.timing import interleave

__all__ = ["run_peer", "PEER_UNET"]

# Same depth (32 -> 16 -> 8) and base width as unet_tiny; their blocks are GroupNorm(8)-based, so 16 channels
# is the nearest width, and one 16-channel attention head keeps the FLOPs near ours (their default, 4 x 32,
# would double them).
PEER_UNET = dict(dim=16, dim_mults=(1, 2, 2), channels=1, attn_heads=1, attn_dim_head=16)


def _peer(size: int, sampling_steps: int):
    import denoising_diffusion_pytorch.denoising_diffusion_pytorch as ddp
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    ddp.tqdm = partial(ddp.tqdm, disable=True)  # their sampling loop draws a progress bar

    torch.manual_seed(0)
    unet = Unet(**PEER_UNET)
    diffusion = GaussianDiffusion(
        unet,
        image_size=size,
        timesteps=1000,
        sampling_timesteps=sampling_steps,
        objective="pred_v",
        beta_schedule="sigmoid",
    )
    return unet, diffusion


def run_peer(
    size: int = 32, batch: int = 128, n_sample: int = 32, seconds: float = 3.0, repeats: int = 3, log=print
) -> dict:
    try:
        unet, peer_diffusion = _peer(size, 50)
    except ImportError as e:
        log(f"  peer skipped: {e} (pip install -c constraints.txt -e '.[bench]')")
        return {"skipped": str(e)}
    ours = build_unet("unet_tiny", size)
    diffusion = make_diffusion()
    x0 = torch.rand(batch, 1, size, size) * 2 - 1  # ours: data in [-1, 1]
    x01 = (x0 + 1) / 2  # theirs: [0, 1], normalised inside
    opts = {
        "ours": torch.optim.AdamW(ours.parameters(), lr=1e-4),
        "peer": torch.optim.AdamW(unet.parameters(), lr=1e-4),
    }

    def train(which: str, bf16: bool):
        def step() -> int:
            with autocast(bf16):
                loss = (
                    diffusion.training_losses(ours, x0)["loss"].mean()
                    if which == "ours"
                    else peer_diffusion(x01)
                )
            opts[which].zero_grad(set_to_none=True)
            loss.backward()
            opts[which].step()
            return batch

        step()
        return step

    def sampling(which: str, bf16: bool):
        def run() -> int:
            with torch.no_grad(), autocast(bf16):
                if which == "ours":
                    sample(
                        ours.eval(), diffusion, (n_sample, 1, size, size), sampler="ddim", steps=50, seed=0
                    )
                else:
                    peer_diffusion.eval().sample(batch_size=n_sample)
            return n_sample

        run()
        return run

    cases = {f"train {w} {p}": train(w, p == "bf16") for p in ("fp32", "bf16") for w in ("ours", "peer")}
    timed_train = interleave(cases, seconds, repeats, 1)
    ours.train(), peer_diffusion.train()
    cases = {f"ddim50 {w} {p}": sampling(w, p == "bf16") for p in ("fp32", "bf16") for w in ("ours", "peer")}
    timed_sample = interleave(cases, seconds, repeats, 1)
    timed = {**timed_train, **timed_sample}

    def peer_call(m, x):
        return m(x, torch.randint(0, 1000, (x.shape[0],)))

    out = {
        "batch": batch,
        "sampling_batch": n_sample,
        "image_size": size,
        "threads": 1,
        "peer_unet": {k: list(v) if isinstance(v, tuple) else v for k, v in PEER_UNET.items()},
        "parameters": {
            "ours": sum(p.numel() for p in ours.parameters()),
            "peer": sum(p.numel() for p in unet.parameters()),
        },
        "gflop_per_image_train": {
            "ours": round(flops_per_image(ours, (1, size, size)) / 1e9, 4),
            "peer": round(flops_per_image(unet, (1, size, size), call=peer_call) / 1e9, 4),
        },
        "rows": [],
    }
    for kind in ("train", "ddim50"):
        for p in ("fp32", "bf16"):
            a, b = timed[f"{kind} ours {p}"]["ips"], timed[f"{kind} peer {p}"]["ips"]
            row = {
                "what": kind,
                "precision": p,
                "ours_images_per_s": round(a, 1),
                "peer_images_per_s": round(b, 1),
                "ours_over_peer": round(a / b, 2),
            }
            out["rows"].append(row)
            log(f"  {kind:<7} {p}: ours {a:7.1f} img/s, peer {b:7.1f} img/s, ratio {a / b:.2f}")
    return out
