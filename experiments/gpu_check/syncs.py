"""Host syncs per training step of the real ``train()``, counted by call site.

``trainer=gpu`` without compile (the syncs come from the framework around the network, and TorchDynamo's
compile would only add minutes) on unet_cifar, bf16-mixed, channels_last, every callback of
``callbacks=default`` on (checkpoints and sample grids outside the counted steps). On CUDA each step runs
under ``torch.cuda.set_sync_debug_mode("warn")`` and every warning is attributed to the innermost frame
outside torch that raised it (``instrument.SyncsPerStep``); on the CPU a dispatch mode counts the
device-to-host reads instead. Logging steps (``trainer.log_every_n_steps``) read values back by design and are
reported apart; every other step should make none.
"""

from __future__ import annotations

from collections import Counter

from experiments.gpu_check.common import Ctx, Record, compose_run_config

__all__ = ["run_syncs"]


def run_syncs(ctx: Ctx, rec: Record) -> None:
    from diffusion_lab.train import train
    from experiments.gpu_check import instrument

    log_every = 5
    steps = 12 if ctx.tiny else 32
    first = 2  # step 0 (lazy initialisation, cuDNN autotuning) and step 1 are not counted
    overrides = (
        ctx.base_overrides()
        + ctx.model_overrides("unet_cifar")
        + [
            "compile=false",
            f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0",
            f"trainer.log_every_n_steps={log_every}",
            "callbacks.sample_grid=null",
            "callbacks.best_checkpoint=null",
            f"callbacks.model_checkpoint.every_n_train_steps={steps}",
            "+callbacks.syncs._target_=experiments.gpu_check.instrument.SyncsPerStep",
            f"+callbacks.syncs.from_step={first}",
        ]
    )
    cfg = compose_run_config(ctx, overrides, ctx.work / "syncs")
    rec.update(model="unet_cifar", steps=steps, log_every_n_steps=log_every, counted_from_step=first)
    instrument.INSTANCES.clear()
    result = train(cfg)
    rec.check("all steps ran", result["global_step"] == steps, result["global_step"])
    counter = next(cb for cb in instrument.INSTANCES if isinstance(cb, instrument.SyncsPerStep))
    plain = [s for s in counter.steps if not s["log_step"]]
    logged = [s for s in counter.steps if s["log_step"]]
    sites_plain, sites_log = Counter(), Counter()
    for s in plain:
        sites_plain.update(s["sites"])
    for s in logged:
        sites_log.update(s["sites"])
    rec["per_step"] = [{k: s[k] for k in ("step", "log_step", "syncs")} for s in counter.steps]
    rec["steps_counted"] = {"plain": len(plain), "log": len(logged)}
    rec["syncs_per_plain_step"] = round(sum(s["syncs"] for s in plain) / max(1, len(plain)), 2)
    rec["syncs_per_log_step"] = round(sum(s["syncs"] for s in logged) / max(1, len(logged)), 2)
    rec["sites_plain_steps"] = dict(sites_plain.most_common(20))
    rec["sites_log_steps"] = dict(sites_log.most_common(20))
    rec["counter"] = "torch.cuda.set_sync_debug_mode('warn')" if ctx.cuda else "dispatch mode: host reads"
    # a target of issue 35 (item 1), reported beside the others rather than failed here: what this section
    # is for is the list of call sites
    rec["no_sync_in_plain_steps"] = sum(s["syncs"] for s in plain) == 0
