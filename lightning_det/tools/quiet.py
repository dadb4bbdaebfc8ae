"""Messages of the libraries underneath that are not the user's business, silenced for every entry point; the
run's own warnings, and every library error, are untouched."""

from __future__ import annotations

import logging
import warnings

#: Warnings by the start of their message (regular expressions), each with why it is noise here.
WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
    r"Precision .* is not supported by the model summary",  # the summary's size estimate under bf16 autocast
    # the EMA callback when the best checkpoint is validated after fit: its weights are in the checkpoint
    r"You're using the WeightAveraging callback, but loading a checkpoint outside the 'fit' stage",
)
#: Log lines of Lightning's rank-zero logger that advertise a product.
ADVERTS = ("litlogger",)


class NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(advert in record.getMessage() for advert in ADVERTS)


def silence_library_noise() -> None:
    """Install the filters (again and again: each is installed once)."""
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, NoAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(NoAdverts())
