"""Score a checkpoint on a dataset with the VOC07, VOC area and COCO metrics, and write result files.

    python -m lightning_det.tools.evaluate ckpt_path=<checkpoint> data=voc data.root=/data/VOCdevkit
    python -m lightning_det.tools.evaluate init_from=<weights> model=<config> data=coco data.root=/data/coco

The second scores pretrained weights without training (a torchvision COCO detector in the config built for it,
``init_from=torchvision:<weights name>``, or a Darknet file), so the published COCO AP can be checked here.

Writes, in the run directory, ``voc/comp4_det_test_<class>.txt`` (the VOC devkit's per-class format: image id,
score, 1-based box), ``coco_results.json`` (COCO's results format with the dataset's category ids) and the results
report's ``pr_curve.png``, ``f1_curve.png``, ``confusion_matrix.png`` and ``labels.png`` (of the scored images).
``tta=true`` scores test-time augmented detections (``conf/test_time_augmentation.yaml``).
It runs through ``Trainer.test`` with the training config's ``trainer`` node, so ``trainer.devices=2`` evaluates on
two devices (or two CPU processes) as training would.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_det.checks.config import check_config, refuse_renamed_overrides
from lightning_det.data.records import AnnotationRecord
from lightning_det.data.transforms.common import DetectionTransform
from lightning_det.metrics import COCOMeanAP, VOCMeanAP
from lightning_det.models.boxes import Detections
from lightning_det.models.detector import Detector
from lightning_det.models.tta import from_config
from lightning_det.report.confusion import confusion_matrix
from lightning_det.report.writer import write_evaluation_report
from lightning_det.tools.batch_size import AUTO, keep_default
from lightning_det.tools.errors import report_errors
from lightning_det.tools.inference import load_detector
from lightning_det.tools.precision import resolve_precision
from lightning_det.tools.train import build_model, load_init_from

log = logging.getLogger(__name__)


def metric_table(class_names: list[str], results: dict[str, dict[str, torch.Tensor]]) -> str:
    """Per-class AP of every metric side by side, then the summary values."""
    names = list(results)
    width = max(8, *(len(c) for c in class_names))
    lines = [f"{'class':<{width}}" + "".join(f"  {n:>9}" for n in names)]
    for index, name in enumerate(class_names):
        values = [results[n]["AP_per_class"][index].item() for n in names]
        lines.append(f"{name:<{width}}" + "".join("        -  " if math.isnan(v) else f"  {v:9.4f}" for v in values))
    lines.append(f"{'mAP':<{width}}" + "".join(f"  {results[n]['mAP'].item():9.4f}" for n in names))
    extra = {k: v for k, v in results["coco"].items() if k not in ("mAP", "AP_per_class")}
    lines.append("coco: " + "  ".join(f"{k}={v.item():.4f}" for k, v in extra.items()))
    return "\n".join(lines)


def write_voc_results(folder: Path, class_names: list[str], stems: list[str], detections: Detections) -> None:
    """One file per class, lines ``<image> <score> <x1> <y1> <x2> <y2>`` in the devkit's 1-based pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {c: [] for c in range(len(class_names))}
    for stem, det in zip(stems, detections):
        for (x1, y1, x2, y2), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            lines[label].append(f"{stem} {score:.6f} {x1 + 1:.1f} {y1 + 1:.1f} {x2:.1f} {y2:.1f}\n")
    for label, name in enumerate(class_names):
        (folder / f"comp4_det_test_{name}.txt").write_text("".join(lines[label]))


def coco_results(image_ids: list[int], detections: Detections, category_ids: list[int]) -> list[dict]:
    return [
        {"image_id": image_id, "category_id": category_ids[label], "score": round(score, 6),
         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]}
        for image_id, det in zip(image_ids, detections)
        for (x1, y1, x2, y2), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
    ]


def record_targets(records: list[AnnotationRecord]) -> Detections:
    """Metric targets straight from the annotations (original pixels, COCO's ``area`` where the dataset has it),
    so nothing is lost in the round trip through the batch."""
    targets = []
    for record in records:
        target = {"boxes": torch.from_numpy(record.boxes), "labels": torch.from_numpy(record.labels),
                  "difficult": torch.from_numpy(record.difficult), "image_id": record.image_id}
        if record.area is not None:
            target["area"] = torch.from_numpy(record.area)
        targets.append(target)
    return targets


class DetectionCollector(L.Callback):
    """Keeps every test batch's detections (original pixels) by image id; ``gathered`` merges the ranks'."""

    def __init__(self) -> None:
        self.by_image: dict[int, dict[str, torch.Tensor]] = {}

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Detections,
                          batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        for image_id, det in zip(batch["meta"]["image_id"].tolist(), outputs):
            self.by_image[image_id] = {k: v.cpu() for k, v in det.items()}

    def gathered(self) -> dict[int, dict[str, torch.Tensor]]:
        """Every rank's detections. Lightning's distributed sampler repeats a few images to even out the ranks;
        keyed by image id, each counts once."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.by_image
        parts: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(parts, self.by_image)
        return {image_id: det for part in parts for image_id, det in part.items()}


def pretrained(cfg: DictConfig, class_names: list[str]) -> tuple[Detector, DetectionTransform]:
    """The model ``cfg`` builds for the dataset's classes, with the ``init_from`` weights and the config's
    evaluation transform: pretrained weights (a torchvision COCO detector, a Darknet file) scored untrained."""
    if not cfg.get("init_from"):
        raise ValueError("evaluate needs ckpt_path=<checkpoint> (a run's) or init_from=<weights> with model=<config>")
    if cfg.data.get("img_size") == "auto":
        raise ValueError("evaluate init_from=...: data.img_size=auto is chosen from training boxes; give the input "
                         "size the weights were trained at, e.g. data.img_size=416")
    model = build_model(cfg, num_classes=len(class_names), class_names=class_names)
    load_init_from(model, cfg)
    model.inference_pipeline = OmegaConf.to_container(cfg.data.pipeline.val_transform, resolve=True)
    return model.eval(), instantiate(cfg.data.pipeline.val_transform)


def evaluate(cfg: DictConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint (or the ``init_from`` weights) on the test split through ``Trainer.test``
    (``trainer.devices=2`` runs one rank per device), scored on rank zero with the three metrics; result files and
    the report are written there."""
    loaded = load_detector(cfg.ckpt_path) if cfg.get("ckpt_path") else None  # a bad checkpoint before any data
    if cfg.data.batch_size == AUTO:
        keep_default(cfg.data, "the search is for training")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    model, pipeline = loaded or pretrained(cfg, list(datamodule.classes))
    model.tta = from_config(cfg)
    if model.tta is not None:
        log.info("test-time augmentation: %d views (scales %s, flip %s) merged by %s", len(model.tta.views()),
                 list(model.tta.scales), model.tta.flip, model.tta.merge)
    if list(datamodule.classes) != model.class_names:
        raise ValueError(
            f"the checkpoint's classes {model.class_names} differ from the dataset's {list(datamodule.classes)}: "
            "set data.classes to the checkpoint's list"
        )
    datamodule.val_transform = pipeline
    collector = DetectionCollector()
    resolve_precision(cfg.trainer, cfg.model.get("_target_"))
    trainer = instantiate(cfg.trainer, callbacks=[collector], logger=False, enable_checkpointing=False,
                          enable_model_summary=False)
    trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    by_image = collector.gathered()
    if not trainer.is_global_zero:
        return {}

    records = datamodule.records["test"]
    detections = [by_image[record.image_id] for record in records]
    targets = record_targets(records)
    n = model.num_classes
    # Scored here on rank zero from the merged detections: no rank would join a synchronisation.
    metrics = {
        "voc07": VOCMeanAP(n, use_07_metric=True, sync_on_compute=False),
        "voc": VOCMeanAP(n, sync_on_compute=False),
        "coco": COCOMeanAP(n, sync_on_compute=False),
    }
    for metric in metrics.values():
        metric.update(detections, targets)
    output = Path(cfg.paths.output_dir)
    write_voc_results(output / "voc", model.class_names, [Path(r.path).stem for r in records], detections)
    category_ids = datamodule.label_to_category_id or list(range(n))
    image_ids = [record.image_id for record in records]
    (output / "coco_results.json").write_text(json.dumps(coco_results(image_ids, detections, category_ids)))
    results = {name: metric.compute() for name, metric in metrics.items()}
    log.info("%d images\n%s", len(records), metric_table(model.class_names, results))
    confusion = confusion_matrix(detections, targets, n, conf=0.25, iou_threshold=0.5)
    write_evaluation_report(output, model.class_names, results["voc"], confusion, records,
                            conf=0.25, iou_threshold=0.5)
    return results


@hydra.main(version_base="1.3", config_path="../../conf", config_name="evaluate")
@report_errors
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    refuse_renamed_overrides(sys.argv[1:])
    main()
