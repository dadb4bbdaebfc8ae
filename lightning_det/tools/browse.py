"""Draw a few batches as the model sees them, with their labels: the check to run before a long training.

    python -m lightning_det.tools.browse data=voc data.root=/data/VOCdevkit model=yolov3 batches=4

Writes ``<split>_batch<i>.png`` to the run directory and logs what the drawn batches hold: objects per class and
the box sizes in network-input pixels (objects much smaller than the finest stride are hard to learn).
"""

from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torchvision.io import write_png
from torchvision.utils import make_grid

from lightning_det.data.collate import Labels
from lightning_det.data.transforms.common import displayable
from lightning_det.report.drawing import draw_labels
from lightning_det.tools.errors import report_errors

log = logging.getLogger(__name__)


def label_summary(labels: torch.Tensor, class_names: list[str]) -> str:
    """Objects per class and box-side quantiles of label rows ``[N, P, 6]`` (padding rows skipped)."""
    rows = Labels.present(labels)
    if len(rows.classes) == 0:
        return "no objects in the drawn batches"
    counts = Counter(class_names[int(c)] for c in rows.classes.tolist())
    sizes = rows.boxes[:, 2:] - rows.boxes[:, :2]
    sides = sizes.min(1).values
    low, mid, high = torch.quantile(sides, torch.tensor([0.05, 0.5, 0.95])).tolist()
    per_class = ", ".join(f"{name} {count}" for name, count in counts.most_common())
    return (f"{len(rows.classes)} objects ({int(rows.difficult.sum())} difficult): {per_class}\n"
            f"shorter box side in input pixels: 5% {low:.1f}, median {mid:.1f}, 95% {high:.1f}")


def browse(cfg: DictConfig) -> list[Path]:
    """Draw ``cfg.batches`` batches of ``cfg.split`` into the run directory; returns the files written."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loaders = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader}
    if cfg.split not in loaders:
        raise ValueError(f"split must be train or val, got {cfg.split!r}")
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    written, labels = [], []
    for number, batch in enumerate(islice(loaders[cfg.split](), cfg.batches)):
        images = displayable(batch["images"])
        drawn = [draw_labels(image, rows, datamodule.classes) for image, rows in zip(images, batch["labels"])]
        path = output / f"{cfg.split}_batch{number}.png"
        write_png(make_grid(drawn, nrow=cfg.images_per_row, pad_value=255), str(path))
        written.append(path)
        labels.append(batch["labels"].reshape(-1, 6))
    log.info("%d batches of %s -> %s\n%s", len(written), cfg.split, output,
             label_summary(torch.cat(labels), list(datamodule.classes)))
    return written


@hydra.main(version_base="1.3", config_path="../../conf", config_name="browse")
@report_errors
def main(cfg: DictConfig) -> None:
    browse(cfg)


if __name__ == "__main__":
    main()
