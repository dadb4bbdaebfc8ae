"""Optimisation helpers: parameter groups and learning-rate schedules built by Hydra partials."""

from lightning_det.optim.param_groups import parameter_groups
from lightning_det.optim.schedules import constant, cosine, exponential, multistep, plateau, polynomial

__all__ = ["parameter_groups", "constant", "cosine", "exponential", "multistep", "plateau", "polynomial"]
