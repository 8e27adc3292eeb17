"""What a config may instantiate, and with which values.

``check_targets``: a run config read from a checkpoint comes from whoever wrote the file, and Hydra's
``instantiate`` calls any importable ``_target_`` (``builtins.open`` creates or truncates a file). Before
anything of it is instantiated, every ``_target_`` in it, at any depth, must lie under one of
``ALLOWED_TARGET_PREFIXES``: this project, torch's optimizers and Lightning.

``check_arguments``: a config value of the wrong type (``trainer.max_steps=abc``) fails deep inside the
instantiated class with a message that names neither the key nor the fix; it is checked first against the
target's annotations and refused with one line naming the key.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ALLOWED_TARGET_PREFIXES", "LEGACY_MODULES", "upgrade_targets", "check_targets", "check_arguments"]

# Modules that lived at the top of the package before it was split into processes / training / utils:
# a checkpoint written then names ``diffusion_lab.schedules.make_schedule``; it now lives in
# ``diffusion_lab.processes.schedules``. Only these exact module names are rewritten.
LEGACY_MODULES = {
    **{m: "processes" for m in ("schedules", "diffusion", "parameterization", "edm", "likelihood")},
    **{
        m: "training"
        for m in (
            "lit_module",
            "callbacks",
            "guards",
            "checkpoint",
            "checkpoint_io",
            "run_lock",
            "loggers",
            "progress_bar",
            "optim",
            "build",
        )
    },
    **{
        m: "utils"
        for m in ("cli", "config_utils", "cpu", "extras", "fileio", "media", "progress", "safe_config")
    },
}


def _upgrade_target(target: Any) -> Any:
    if not isinstance(target, str) or not target.startswith("diffusion_lab."):
        return target
    parts = target.split(".")
    if len(parts) >= 3 and parts[1] in LEGACY_MODULES:
        return ".".join(["diffusion_lab", LEGACY_MODULES[parts[1]], *parts[1:]])
    return target


def upgrade_targets(node: Any) -> Any:
    """A plain config with every pre-split ``diffusion_lab.<module>.X`` target renamed, at any depth."""
    if isinstance(node, dict):
        return {k: (_upgrade_target(v) if k == "_target_" else upgrade_targets(v)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [upgrade_targets(v) for v in node]
    return node


ALLOWED_TARGET_PREFIXES = ("diffusion_lab.", "torch.optim.", "lightning.")


def _walk_targets(node: Any, key: str):
    """(dotted key of the ``_target_``, its value) for every ``_target_`` in ``node``, at any depth."""
    if isinstance(node, (DictConfig, dict)):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for k, v in items:
            sub = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                yield sub, v
            else:
                yield from _walk_targets(v, sub)
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, v in enumerate(node):
            yield from _walk_targets(v, f"{key}[{i}]")


def check_targets(node: Any, key: str, source: str = "config") -> None:
    """Raise ValueError naming the first ``_target_`` in ``node`` outside ``ALLOWED_TARGET_PREFIXES``.

    Args:
        node: a config (DictConfig or plain container), resolved.
        key: its dotted name in the run config (``model``), used in the message (``model._target_``).
        source: where the config comes from, for the message (``checkpoint PATH``).
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    for name, target in _walk_targets(node, key):
        if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
            raise ValueError(
                f"{source}: {name}={target!r} refused: only targets under "
                f"{', '.join(ALLOWED_TARGET_PREFIXES)} are instantiated from a stored config; "
                "use a checkpoint from a source you trust, or retrain"
            )


# ----------------------------------------------------------------------------------- argument types


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fits(value: Any, tp: Any) -> bool | None:
    """True / False when ``value`` does / does not fit annotation ``tp``; None when it cannot tell."""
    if tp is Any or tp is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(value, a) for a in typing.get_args(tp)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return None  # classes, containers, paths, ...: not judged here


def _annotations(target: Any) -> dict[str, Any]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: nothing is judged
        return {}


def check_arguments(node: DictConfig, key: str) -> None:
    """Raise ValueError naming the first scalar value of ``node`` that its target's annotation rules out.

    Only plain values (numbers, strings, booleans, null) against annotations made of ``int``, ``float``,
    ``bool``, ``str``, ``None`` and ``Literal`` are judged; anything else passes.
    """
    from hydra.utils import get_object

    target = node.get("_target_")
    if not isinstance(target, str):
        return
    try:
        obj = get_object(target)
    except Exception:
        return  # Hydra's own error names the target
    hints = _annotations(obj)
    for name, value in node.items():
        if name.startswith("_") or name not in hints or isinstance(value, (DictConfig, ListConfig)):
            continue
        tp = hints[name]
        if _fits(value, tp) is False:
            wanted = (
                " or ".join(_describe(a) for a in typing.get_args(tp))
                if typing.get_origin(tp) in (typing.Union, types.UnionType)
                else _describe(tp)
            )
            raise ValueError(f"{key}.{name}={value!r} is not valid: expected {wanted}")
