"""What a config may instantiate, and with which values.

``check_targets``: a run config read from a checkpoint comes from whoever wrote the file, and Hydra's
``instantiate`` calls any importable ``_target_`` (``builtins.open`` creates or truncates a file; this
project's own ``download_file`` fetches a URL into any path). Before anything of a stored config is
instantiated, every ``_target_`` in it, at any depth (inside ``_args_`` lists too, whatever ``_partial_`` or
``_recursive_`` say), must be one of :func:`allowed_targets`, compared as exact names:

- the targets that the files under ``conf/`` name (read once from the YAML files, so a new model, objective
  or sampler config admits its class by existing), except those in launch-time parts of a config
  (:data:`LAUNCH_TIME_KEYS`: trainer, callbacks, loggers, Hydra's launchers and sweepers). Those parts are
  built by ``train.py`` from the command line, never from a checkpoint, and their classes write files where
  their arguments say (``ModelCheckpoint``, ``CSVLogger``) or start processes;
- :data:`LEGACY_TARGETS`, which checkpoints of earlier versions of this project name;
- a user's own classes, admitted by the code or the shell that runs the command, never by a config (which a
  checkpoint could carry): ``allow_targets("mypkg.MyNet")`` in their code, or
  ``DIFFUSION_LAB_ALLOWED_TARGETS="mypkg.MyNet mypkg.my_schedule"`` (names separated by spaces or commas).

Modules that write, delete or fetch files (:data:`NEVER_FROM_CONF`) are refused even if a file under
``conf/`` named one of their functions.

``check_arguments``: a config value of the wrong type (``trainer.max_steps=abc``) fails deep inside the
instantiated class with a message that names neither the key nor the fix; it is checked first against the
target's annotations and refused with one line naming the key. The groups with a dataclass
(objective, sampler, dataset, metrics: :mod:`diffusion_lab.config_schema`) are checked against it instead;
this check covers the others (model, optimizer, lr_scheduler, trainer) and admitted third-party targets.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "ENV_VAR",
    "LAUNCH_TIME_KEYS",
    "LEGACY_MODULES",
    "LEGACY_TARGETS",
    "NEVER_FROM_CONF",
    "allow_targets",
    "allowed_targets",
    "conf_targets",
    "upgrade_targets",
    "check_targets",
    "check_stored_config",
    "check_arguments",
]

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


# ------------------------------------------------------------------------------------------ the allow-list

ENV_VAR = "DIFFUSION_LAB_ALLOWED_TARGETS"
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Top-level keys of a run config that only ``train.py`` builds, from the command line: their targets (the
# Trainer and its strategy, ModelCheckpoint, loggers, Hydra's launchers, sweepers and callbacks) write files
# where their arguments say or start processes, and no command instantiates them from a checkpoint.
LAUNCH_TIME_KEYS = frozenset({"hydra", "hparams_search", "trainer", "callbacks", "logger", "paths"})

# Targets that checkpoints of earlier versions of this project name (after ``upgrade_targets``), admitted
# even where a file under conf/ no longer names them.
LEGACY_TARGETS = frozenset(
    {
        "diffusion_lab.data.DiffusionDataModule",
        "diffusion_lab.models.MLP",
        "diffusion_lab.models.UNet",
        "diffusion_lab.processes.diffusion.GaussianDiffusion",
        "diffusion_lab.processes.edm.EDMDiffusion",
        "diffusion_lab.processes.schedules.make_schedule",
        "diffusion_lab.samplers.ddim_sample",
        "diffusion_lab.samplers.ddpm_sample",
        "diffusion_lab.samplers.dpm_solver_sample",
        "diffusion_lab.samplers.euler_sample",
        "diffusion_lab.samplers.heun_sample",
        "diffusion_lab.training.optim.warmup_cosine",
        "torch.optim.AdamW",
    }
)

# Modules whose functions write, delete or fetch files or run programs: never admitted from conf/ (a config
# naming one is a mistake that would turn every checkpoint into a way to write files).
NEVER_FROM_CONF = (
    "builtins",
    "io",
    "os",
    "pathlib",
    "shutil",
    "subprocess",
    "urllib",
    "torch.hub",
    "torch.save",
    "torch.load",
    "lightning.fabric.utilities.cloud_io",
    "diffusion_lab.data.cache",
    "diffusion_lab.data.download",
    "diffusion_lab.training.checkpoint_io",
    "diffusion_lab.training.run_lock",
    "diffusion_lab.utils.fileio",
    "diffusion_lab.utils.media",
)

_admitted: set[str] = set()


def _never(target: str) -> bool:
    return any(target == m or target.startswith(m + ".") for m in NEVER_FROM_CONF)


def allow_targets(*targets: str) -> None:
    """Admit the user's own classes or functions (exact dotted names, as in ``_target_``) for stored configs.

    Call it from the code that loads the checkpoint (``allow_targets("mypkg.MyNet")``), or set
    ``DIFFUSION_LAB_ALLOWED_TARGETS`` for the commands; a config cannot do either.
    """
    for t in targets:
        if not isinstance(t, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", t):
            raise ValueError(f"allow_targets: {t!r} is not a dotted name such as 'mypkg.models.MyNet'")
        _admitted.add(t)


def _package(path: Path, group: str) -> list[str]:
    """Where the content of a conf/ file lands in the composed config (Hydra's ``# @package`` rules)."""
    package = group.replace("/", ".")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            m = re.match(r"#\s*@package\s+(\S+)", line)
            if m:
                package = m.group(1).replace("_group_", group.replace("/", "."))
                package = "" if package == "_global_" else package.removeprefix("_global_.")
    return [p for p in package.split(".") if p]


def _yaml_targets(node: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                yield path, v
            else:
                yield from _yaml_targets(v, [*path, str(k)])
    elif isinstance(node, list):
        for v in node:
            yield from _yaml_targets(v, path)


@functools.cache
def _conf_targets(conf_dir: str) -> frozenset[str]:
    found = set()
    root = Path(conf_dir)
    for path in sorted(root.rglob("*.yaml")):
        group = path.parent.relative_to(root).as_posix().strip(".")
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        for keys, target in _yaml_targets(data, _package(path, group)):
            if keys and keys[0] in LAUNCH_TIME_KEYS:
                continue
            # "???" (OmegaConf's unset value, conf/sampler_options.yaml) and interpolations name no class
            if isinstance(target, str) and target != "???" and "${" not in target and not _never(target):
                found.add(target)
    return frozenset(found)


def conf_targets(conf_dir: str | Path = CONF_DIR) -> frozenset[str]:
    """Every ``_target_`` that the YAML files under ``conf_dir`` name outside :data:`LAUNCH_TIME_KEYS`
    (read once per process), less those in :data:`NEVER_FROM_CONF`."""
    return _conf_targets(str(conf_dir))


def allowed_targets() -> frozenset[str]:
    """The exact targets a stored config may instantiate: :func:`conf_targets`, :data:`LEGACY_TARGETS`,
    those admitted by :func:`allow_targets` and those in ``$DIFFUSION_LAB_ALLOWED_TARGETS``."""
    from_env = {t for t in re.split(r"[\s,]+", os.environ.get(ENV_VAR, "")) if t}
    legacy = {t for t in LEGACY_TARGETS if not _never(t)}
    return conf_targets() | legacy | _admitted | from_env


def _walk_targets(node: Any, key: str):
    """(dotted key of the ``_target_``, its value) for every ``_target_`` in ``node``, at any depth: also in
    lists such as ``_args_``, and whatever ``_partial_`` or ``_recursive_`` say."""
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
    """Raise ValueError naming the first ``_target_`` in ``node`` that is not in :func:`allowed_targets`.

    Args:
        node: a config (DictConfig or plain container); a DictConfig is resolved first, as ``instantiate``
            would resolve it.
        key: its dotted name in the run config (``model``), used in the message (``model._target_``).
        source: where the config comes from, for the message (``checkpoint PATH``).
    """
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=True)
    allowed = None
    for name, target in _walk_targets(node, key):
        if not isinstance(target, str):
            raise ValueError(
                f"{source}: {name}={target!r} refused: a target must be a dotted name (a string); "
                "use a checkpoint from a source you trust, or retrain"
            )
        allowed = allowed_targets() if allowed is None else allowed
        if target not in allowed:
            raise ValueError(
                f"{source}: {name}={target!r} refused: a stored config instantiates only the classes and "
                f"functions that the configs under conf/ name; if you trust this file and {target} is your "
                f'own class, admit it with {ENV_VAR}={target} (README "Safe by default")'
            )


def check_stored_config(cfg: Any, source: str = "config") -> None:
    """:func:`check_targets` on every top-level entry of a stored run config outside
    :data:`LAUNCH_TIME_KEYS` (those are never instantiated from a stored config)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    for key, node in cfg.items():
        if str(key) not in LAUNCH_TIME_KEYS:
            check_targets(node, str(key), source)


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
