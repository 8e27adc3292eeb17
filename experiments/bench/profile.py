"""Where a training step's time goes: ``torch.profiler`` over a few steps of the project's U-Nets, each
operator's own (self) CPU time put into a group by the operator that called it.

A step is the one ``experiments.bench.setups.train_step`` times (forward + loss, backward, AdamW), in the
precision the CPU trainer picks (``bf16-mixed`` only on a CPU with bf16 units). Every profiled event's self
time goes to one group: the phase (``record_function`` ranges around forward, backward and the optimizer)
and the outermost enclosing operator that names a kind of work (a convolution, attention, GroupNorm, a
Linear, a dtype cast); what matches none is "elementwise and other". "python and framework" is the self time
of the phase ranges and of autograd's per-node wrappers (the interpreter between operators, autograd's
bookkeeping) plus the step's wall time that no event accounts for; the profiler's own cost inflates it.
With ``lightning``, one step through the project's LightningModule and a ``Trainer`` is timed beside the bare
step (the Lightning loop's cost per step).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from experiments.bench.setups import TrainSetup, autocast, build_backbone, make_diffusion

__all__ = ["classify", "profile_step", "run_profile", "GROUP_ORDER"]

# (group, substrings of a lower-cased operator or autograd-node name); the first pattern that matches the
# outermost named ancestor decides, except for casts: autocast's casts are ``aten::_to_copy`` (forward) and
# ``ToCopyBackward0`` (backward) and count as casts wherever they sit (autocast runs them inside the operator
# that needs them, e.g. under ``aten::conv2d``).
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dtype casts", ("_to_copy", "tocopybackward")),
    ("attention", ("scaled_dot_product", "attention")),
    ("convolutions", ("conv",)),
    ("normalisation", ("group_norm", "groupnorm")),
    ("linear (embeddings)", ("linear", "addmm")),
)
PHASES = ("forward", "backward", "optimizer")
GROUP_ORDER = [f"{kind} {phase}" for kind, _ in KINDS for phase in ("forward", "backward")] + [
    "elementwise and other forward",
    "elementwise and other backward",
    "optimizer (AdamW)",
    "zero_grad and other",
    "python and framework",
]


def classify(names: list[str]) -> str:
    """The kind of work of an event from its ancestors' names, outermost first (e.g. ``["aten::conv2d",
    "aten::mkldnn_convolution"]`` -> "convolutions")."""
    lows = [n.lower() for n in names]
    cast, cast_patterns = KINDS[0]
    if any(p in low for low in lows for p in cast_patterns):
        return cast  # autocast's casts run inside the operator that asked for them
    for low in lows:
        for kind, patterns in KINDS[1:]:
            if any(p in low for p in patterns):
                return kind
    return "elementwise and other"


def _group(event) -> str:
    chain = []
    e = event
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    chain.reverse()  # outermost first
    if event.name.startswith(("bench::", "autograd::engine::")):
        return "python and framework"  # the interpreter between operators, autograd's own bookkeeping
    phase = next((n.removeprefix("bench::") for n in chain if n.startswith("bench::")), None)
    if phase == "optimizer":
        return "optimizer (AdamW)"
    if phase not in ("forward", "backward"):
        return "zero_grad and other"
    return f"{classify([n for n in chain if not n.startswith('bench::')])} {phase}"


def _make_step(model_name: str, size: int, setup: TrainSetup):
    torch.manual_seed(0)
    model = build_backbone(model_name, size)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    diffusion = make_diffusion()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, **({} if setup.fused is None else {"fused": setup.fused})
    )
    if setup.compile:
        model.compile()
    x0 = torch.rand(setup.batch, 1, size, size) * 2 - 1

    def step() -> None:
        with record_function("bench::forward"), autocast(setup.bf16):
            loss = diffusion.training_losses(model, x0)["loss"].mean()
        with record_function("bench::zero_grad"):
            opt.zero_grad(set_to_none=True)
        with record_function("bench::backward"):
            loss.backward()
        with record_function("bench::optimizer"):
            opt.step()

    return step


def profile_step(model_name: str, size: int, setup: TrainSetup, steps: int = 3) -> dict:
    """ms per step of every group (over ``steps`` profiled steps after two warm-up steps)."""
    torch.set_num_threads(setup.threads)
    step = _make_step(model_name, size, setup)
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    ms: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0:
            ms[_group(e)] += e.self_cpu_time_total / 1000 / steps
    step_ms = wall * 1000 / steps
    ms["python and framework"] += max(0.0, step_ms - sum(ms.values()))
    # with one thread the operators' CPU time sums to the wall time; with more it can exceed it
    return {"step_ms": step_ms, "groups_ms": dict(ms)}


def _lightning_vs_bare(model_name: str, size: int, setup: TrainSetup, steps: int) -> dict:
    """Seconds per step of ``steps`` steps through Lightning (after a warm-up) and of the bare step."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from diffusion_lab.training.lit_module import DiffusionModule

    torch.set_num_threads(setup.threads)
    torch.manual_seed(0)
    model = build_backbone(model_name, size)
    diffusion = make_diffusion()
    x0 = torch.rand(setup.batch, 1, size, size) * 2 - 1
    module = DiffusionModule(
        model=model,
        diffusion=diffusion,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4),
        image_shape=(1, size, size),
        num_classes=10,
    )
    data = DataLoader(
        TensorDataset(
            x0.repeat(steps + 2, 1, 1, 1), torch.zeros(setup.batch * (steps + 2), dtype=torch.long)
        ),
        batch_size=setup.batch,
    )

    class Clock(L.Callback):
        def __init__(self):
            self.t: list[float] = []

        def on_train_batch_end(self, *args, **kwargs):
            self.t.append(time.perf_counter())

    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed" if setup.bf16 else "32-true",
        max_steps=steps + 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(module, data)
    lightning_s = (clock.t[-1] - clock.t[1]) / (len(clock.t) - 2)
    step = _make_step(model_name, size, setup)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"lightning_ms": lightning_s * 1000, "bare_ms": (time.perf_counter() - start) * 1000 / steps}


def run_profile(bf16: bool, steps: int = 3, lightning_steps: int = 8, log=print) -> list[dict]:
    """Per model: the step's breakdown (ms and % per group) and, where it ran, Lightning's cost per step."""
    precision = "bf16-mixed" if bf16 else "fp32"
    out = []
    for model_name, size, batch in (("unet_tiny", 32, 128), ("unet_small", 32, 16)):
        setup = TrainSetup(bf16=bf16, batch=batch)
        got = profile_step(model_name, size, setup, steps)
        total = got["step_ms"]
        groups = [
            {
                "group": g,
                "ms": round(got["groups_ms"].get(g, 0.0), 2),
                "pct": round(100 * got["groups_ms"].get(g, 0.0) / total, 1),
            }
            for g in GROUP_ORDER
            if got["groups_ms"].get(g, 0.0) > 0
        ]
        row = {
            "model": model_name,
            "image_size": size,
            "batch": batch,
            "precision": precision,
            "step_ms": round(total, 1),
            "groups": groups,
        }
        log(f"  {model_name} {size}px batch {batch} {precision}: {total:.1f} ms per step (profiled)")
        for g in groups:
            log(f"    {g['group']:<34} {g['ms']:8.2f} ms  {g['pct']:5.1f}%")
        if lightning_steps and model_name == "unet_tiny":
            lv = _lightning_vs_bare(model_name, size, setup, lightning_steps)
            row["lightning_ms"] = round(lv["lightning_ms"], 1)
            row["bare_ms"] = round(lv["bare_ms"], 1)
            row["lightning_overhead_pct"] = round(100 * (lv["lightning_ms"] / lv["bare_ms"] - 1), 1)
            log(
                f"    through Lightning {lv['lightning_ms']:.1f} ms vs bare {lv['bare_ms']:.1f} ms per step "
                f"({row['lightning_overhead_pct']:+.1f}%)"
            )
        out.append(row)
    return out
