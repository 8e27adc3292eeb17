"""Which sampler ``sample`` and ``evaluate`` draw with: the checkpoint's own, unless the command line says.

A run stores its ``sampler`` config (steps, grid, churn, guidance) in the checkpoint's run config; that is
how its author meant it to be sampled. The commands' config leaves the ``sampler`` group unchosen, so:

- ``sampler=ddim ...`` on the command line: that config from ``conf/sampler/`` (the checkpoint's ignored);
- nothing: the checkpoint's sampler;
- ``sampler.steps=50`` alone: the checkpoint's sampler with that key changed (the others kept);
- a checkpoint without a stored sampler (written before runs stored one): ``conf/sampler/<fallback>.yaml``,
  and a line saying so.

The commands' config includes ``conf/sampler_options.yaml`` (every sampler option, unset) before the
``sampler`` group, so Hydra takes ``sampler.steps=50`` without a ``sampler=``; :func:`given_options` keeps
the keys that were set.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["SamplerChoice", "given_options", "choose_sampler", "sampler_name", "describe_sampler"]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
_HIDDEN = ("_target_", "_partial_")


class SamplerChoice:
    """The sampler config to instantiate and where it came from (``checkpoint``, ``command line`` or
    ``default``); ``line`` says both in one line for the command's first output."""

    def __init__(self, config: DictConfig, source: str, line: str):
        self.config, self.source, self.line = config, source, line

    def __repr__(self) -> str:
        return f"SamplerChoice(source={self.source!r}, config={OmegaConf.to_container(self.config)!r})"


def given_options(node: DictConfig | dict | None) -> DictConfig:
    """The keys of a command's ``sampler`` node that are set (``???``: an option of conf/sampler_options.yaml
    that neither the command line nor a ``sampler=`` choice gave)."""
    if node is None:
        return OmegaConf.create({})
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(node)
    return OmegaConf.create({k: node[k] for k in node if not OmegaConf.is_missing(node, k)})


def sampler_name(config: DictConfig | dict) -> str:
    """``heun`` for ``diffusion_lab.samplers.heun_sample``."""
    return str(config.get("_target_", "?")).rsplit(".", 1)[-1].removesuffix("_sample")


def describe_sampler(config: DictConfig | dict) -> str:
    """``steps=18 grid=karras S_churn=2.0 ...``: the options, without ``_target_`` / ``_partial_``."""
    plain = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    return " ".join(f"{k}={v}" for k, v in plain.items() if k not in _HIDDEN)


def _load_default(name: str) -> DictConfig:
    path = CONF_DIR / "sampler" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"sampler_fallback={name!r} is not a sampler config: choose one of {options}")
    return OmegaConf.load(path)


def choose_sampler(
    requested: DictConfig | dict | None,
    stored: DictConfig | dict | None,
    fallback: str,
    source: str = "checkpoint",
) -> SamplerChoice:
    """The sampler config to draw with (see the module docstring).

    Args:
        requested: the command's ``sampler`` node: a whole config (it has a ``_target_``: a ``sampler=``
            choice), some keys only (partial overrides of the base), or None / empty.
        stored: the checkpoint's run config ``sampler`` (None for checkpoints without one).
        fallback: the ``conf/sampler/`` config used when the checkpoint stores none.
        source: where ``stored`` comes from (``checkpoint PATH``), for the target check's message.

    Raises:
        ValueError: a partial override names an option the base sampler does not take; a ``_target_``
            outside this project's allowed targets.
    """
    from diffusion_lab.utils.safe_config import check_targets

    requested = given_options(requested)
    if "_target_" in requested:
        config, origin, where = requested, "command line", "chosen with sampler= on the command line"
    else:
        if stored is not None and "_target_" in stored:
            base, origin, where = OmegaConf.create(stored), "checkpoint", "the checkpoint's"
        else:
            base, origin = _load_default(fallback), "default"
            where = f"this checkpoint stores no sampler config: the default sampler={fallback}"
        unknown = [k for k in requested if k not in base]
        if unknown:
            raise ValueError(
                f"sampler.{unknown[0]} is not an option of the {sampler_name(base)} sampler ({where}); its "
                f"options: {', '.join(k for k in base if k not in _HIDDEN)}; to use another sampler name it, "
                f"e.g. sampler=heun sampler.{unknown[0]}=..."
            )
        config = OmegaConf.merge(base, requested)
        if len(requested):
            changed = " ".join(f"sampler.{k}" for k in requested)
            where += f", with {changed} from the command line"
    check_targets(config, "sampler", source=source)
    line = f"sampler: {sampler_name(config)} ({where}): {describe_sampler(config)}"
    return SamplerChoice(config, origin, line)
