"""Print YOLOv3 anchors clustered on the configured training set, with their best possible recall.

    python -m lightning_det.tools.anchors data=voc data.root=/data/VOCdevkit model=yolov3
    python -m lightning_det.tools.anchors data.classes=null model=yolov3_tiny data.img_size=608

Uses the same config as ``train.py``: the data group picks the training set, the model its number of levels
and anchors per level, ``data.img_size`` the input size and ``model.assigner.positive_iou`` the recall threshold.
"""

from __future__ import annotations

import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_det.checks.config import refuse_renamed_overrides
from lightning_det.models.yolov3.anchor_clustering import anchor_fitness, kmeans_anchors, letterboxed_sizes
from lightning_det.models.yolov3.grid import anchors_tensor, configured_anchors
from lightning_det.models.yolov3.module import assigner_positive_iou
from lightning_det.tools.errors import report_errors


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
@report_errors
def main(cfg: DictConfig) -> None:
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    records = datamodule.dataset("train").records
    img_size = datamodule.img_size  # a number once the annotations are read (img_size: auto)
    wh = letterboxed_sizes(records, img_size)
    current = anchors_tensor(configured_anchors(cfg.model.get("anchors"), cfg.model.variant))
    levels, per_level = current.shape[:2]
    anchors = kmeans_anchors(wh, levels * per_level, seed=cfg.seed)
    positive_iou = assigner_positive_iou(OmegaConf.to_container(cfg.model, resolve=True).get("assigner"))
    rows = [("configured", current.reshape(-1, 2)), ("clustered", anchors)]
    print(f"{len(wh)} training boxes at img_size {img_size}, positive_iou {positive_iou}")
    for name, table in rows:
        fit = anchor_fitness(wh, table, positive_iou)
        print(f"{name:>10}: mean best IoU {fit['mean_iou']:.3f}, best possible recall {fit['best_possible_recall']:.3f}")
    print("model:\n  anchors:")
    for level in anchors.round().int().view(levels, per_level * 2).tolist():
        print(f"    - {level}")


if __name__ == "__main__":
    refuse_renamed_overrides(sys.argv[1:])
    main()
