"""The framework's own errors print as their message alone; the traceback comes with ``HYDRA_FULL_ERROR=1``.

A bad annotation, a missing ``data.root`` or a wrong setting is stopped with a message that names the file and the
fix; 20-40 lines of traceback above it only hide it. Every command-line tool's Hydra task is wrapped in
``report_errors``, which turns such an error into Hydra's own compact kind: Hydra then prints the message alone,
as it does for its own config errors (with the job's overrides before it and its hint on ``HYDRA_FULL_ERROR``
after), exits with status 1, and still runs its job-end callbacks (the sweep summary of a multirun).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig

from lightning_det.data.cache import ImageCacheError
from lightning_det.data.records import ImageLoadError
from lightning_det.models.detector import NonFiniteLossError
from lightning_det.tools.quiet import silence_library_noise

PACKAGE = Path(__file__).resolve().parents[1]

#: The kinds of error the framework raises with a message for its users (``InvalidAnnotationError``,
#: ``ConfigValueError`` and ``CheckpointError`` are ``ValueError``s). Other kinds, or these raised by a library, are
#: a bug's: their traceback stays.
USER_ERRORS = (ValueError, OSError, ImportError, ImageLoadError, ImageCacheError, NonFiniteLossError)

Result = TypeVar("Result")


class FrameworkError(CompactHydraException):
    """A framework error in the form Hydra prints without a traceback."""


def raised_by_framework(error: BaseException) -> bool:
    """Whether ``error`` is of a user-facing kind and its innermost frame is in this package."""
    if not isinstance(error, USER_ERRORS) or error.__traceback__ is None:
        return False
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def framework_error(error: BaseException) -> BaseException | None:
    """The framework's own error behind ``error`` (itself, or what a config object's constructor raised inside
    ``hydra.utils.instantiate``); None for any other error."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if raised_by_framework(error) else None


def report_errors(task: Callable[[DictConfig], Result]) -> Callable[[DictConfig], Result]:
    """Wrap a Hydra task (under ``@hydra.main``) so that the framework's own errors print as ``Error: <message>``;
    every entry point goes through it, so it also silences the libraries' noise (``tools/quiet.py``)."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> Result:
        silence_library_noise()
        try:
            return task(cfg)
        except Exception as error:
            own = framework_error(error)
            if own is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            raise FrameworkError(f"Error: {own}") from error

    return run
