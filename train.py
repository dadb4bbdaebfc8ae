"""Train a detector: ``python train.py model=yolov3 data=voc data.root=/data/VOCdevkit trainer.devices=4``."""

import hydra
from omegaconf import DictConfig

from lightning_det.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the best validation score so Hydra sweepers can optimise it."""
    return run(cfg)["best_score"]


if __name__ == "__main__":
    main()
