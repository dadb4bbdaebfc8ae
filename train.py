"""Train a detector: ``python train.py model=yolov3 data=voc data.root=/data/VOCdevkit trainer.devices=4``."""

import sys

import hydra
from omegaconf import DictConfig

from lightning_det.api.jobs import train_or_search
from lightning_det.checks.config import refuse_renamed_overrides
from lightning_det.tools.errors import report_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    """Returns the best validation score so Hydra sweepers can optimise it. With ``hparams_search=<name>``, runs
    (or resumes) that Optuna search instead of one training."""
    return train_or_search(cfg)["best_score"]


if __name__ == "__main__":
    refuse_renamed_overrides(sys.argv[1:])
    main()
