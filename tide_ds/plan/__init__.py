"""Plan a run before queueing it: ``python -m tide_ds.plan --recipe R --world-size N [...]``.

:mod:`tide_ds.plan.checks` runs the one pass of start checks (the same function ``launch/run.py`` and
``launch/slurm/submit.py`` call before anything is created); :mod:`tide_ds.plan.planner` sizes the run per rank and decides the
teacher placement with the loader's own function; :mod:`tide_ds.plan.memory` holds the arithmetic.
"""

from __future__ import annotations

from tide_ds.config import RunConfig
from tide_ds.errors import ConfigError


def prepare_run(cfg: RunConfig, *, world_size: int, on_gpu: bool, world_built: bool = False) -> RunConfig:
    """The launch hook: the one pass of start checks (:func:`tide_ds.plan.checks.validate_run`), then ``cfg``
    with the derived accumulation and step count.

    Raises :class:`~tide_ds.errors.ConfigError` for anything the user can fix (the model code's own checks of a
    checkpoint raise ``ValueError`` or ``FileNotFoundError``: they name the file and the fix, and are passed on
    as user errors).
    """
    from tide_ds.plan.checks import resolved_config, validate_run

    try:
        return resolved_config(cfg, validate_run(cfg, world_size=world_size, on_gpu=on_gpu,
                                                world_built=world_built))
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
