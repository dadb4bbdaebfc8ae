"""SSD300, SSD512 and SSDLite: ``network``, ``priors``, ``targets``, ``loss``, ``decode``, ``module``."""

from lightning_det.models.ssd.module import SSD

__all__ = ["SSD"]
