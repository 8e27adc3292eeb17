"""The third-party filters are narrow: only Lightning's advertisements and only the LeafSpec warning raised
from Lightning's own _pytree module are dropped; the same texts from anywhere else, and Lightning's other
messages, still show."""

from __future__ import annotations

import logging
import warnings

import pytest

from diffusion_lab.utils.quiet import LIGHTNING_INFO_LOGGERS, quiet_third_party_notices

LEAFSPEC = (
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
    "treespec.is_leaf()` instead."
)
LITLOGGER_TIP = (
    "💡 Tip: For seamless cloud logging and experiment tracking, try installing "
    "[litlogger](https://pypi.org/project/litlogger/) to enable LitLogger, which logs metrics and artifacts "
    "automatically to the Lightning Experiments platform."
)


def _warn_from(module: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_notices()  # in front of "always", as in a run
        warnings.warn_explicit(
            LEAFSPEC, FutureWarning, f"/x/{module.replace('.', '/')}.py", 21, module=module
        )
    return caught


def test_leafspec_warning_is_dropped_only_from_lightning():
    assert _warn_from("lightning.pytorch.utilities._pytree") == []
    assert len(_warn_from("my_project.trees")) == 1


@pytest.mark.parametrize("name", LIGHTNING_INFO_LOGGERS)
def test_only_the_advertisements_are_dropped(name, caplog):
    quiet_third_party_notices()
    quiet_third_party_notices()  # idempotent
    logger = logging.getLogger(name)
    caplog.set_level(logging.INFO)
    with caplog.at_level(logging.INFO, logger=name):
        logger.info(LITLOGGER_TIP)
        logger.info(LITLOGGER_TIP.replace("litlogger", "litmodels"))
        logger.info("GPU available: False, used: False")
        logging.getLogger("my_project").info(LITLOGGER_TIP)
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False", LITLOGGER_TIP]
