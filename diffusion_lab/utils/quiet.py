"""Third-party notices that are no business of a user of this project, silenced where they arise.

The first screen of a run is the config tree, the run directory and the progress bar. Two notices of
Lightning's that are not about the run are dropped, each by a filter on its exact text and origin (never all
warnings, nor all of Lightning's messages):

- its advertisements, ``💡 Tip: ... [litlogger](...)`` and ``💡 Tip: ... [litmodels](...)``, logged at INFO
  through ``rank_zero_info`` (logger ``lightning.pytorch.utilities.rank_zero``) whenever a Trainer is built
  without a LitLogger, or without a checkpoint callback; Lightning has no switch for them;
- torch's ``FutureWarning`` that ``isinstance(treespec, LeafSpec)`` is deprecated, raised where Lightning's
  own ``lightning/pytorch/utilities/_pytree.py`` builds a ``LeafSpec`` (its CombinedLoader, at every fit).
  The same warning raised from any other module still shows.

:func:`quiet_third_party_notices` installs the filters; the entry points call it (``train``), not an import.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["quiet_third_party_notices", "LIGHTNING_INFO_LOGGERS"]

# where lightning_utilities' rank_zero_info logs: the last of these that was imported
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
_ADVERT = re.compile(r"💡 Tip: .*\[(litlogger|litmodels)\]\(https://pypi\.org/project/")
_LEAFSPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
_LEAFSPEC_ORIGIN = r"lightning\.pytorch\.utilities\._pytree"


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and _ADVERT.match(record.msg))


_DROP_ADVERTS = _DropAdverts()


def quiet_third_party_notices() -> None:
    """Drop Lightning's litlogger / litmodels tips and its LeafSpec deprecation warning (idempotent)."""
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_ADVERTS not in logger.filters:
            logger.addFilter(_DROP_ADVERTS)
    warnings.filterwarnings("ignore", message=_LEAFSPEC, category=FutureWarning, module=_LEAFSPEC_ORIGIN)
