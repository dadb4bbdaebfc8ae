"""The shared LightningModule: everything a detector does that is not its network, targets, loss or decoding.

A subclass implements three hooks and nothing else of the loop:

- ``forward(images)``: raw network outputs of normalised images (the same in train and eval mode, so validation
  can compute losses);
- ``loss(outputs, batch)``: a dict of loss terms with the total under ``"loss"``;
- ``decode(outputs, batch)``: per image ``{"boxes", "scores", "labels"}`` in batch-image pixels.

and, where the family has them, the hooks the tools call: ``fit_to_data`` (settings resolved from the training
boxes, before the network is built), ``decode_padded`` (fixed-shape decoding: what ``export`` puts in the graph)
and ``load_foreign_weights`` (``init_from`` for the reference implementation's weight files).

The base normalises the batch's pixels (``pixel_mean`` / ``pixel_std``: the model's, so a checkpoint knows its
own), maps detections back to original-image pixels, logs every loss term under ``train/`` and ``val/``,
computes the validation metric, builds the optimizer and scheduler from Hydra partials, and stops training
cleanly when the loss stops being finite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Union

import lightning as L
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils._pytree import tree_map_only

from lightning_det.data.collate import Labels
from lightning_det.models.boxes import Detections, clip_to_images
from lightning_det.models.parts import Loss
from lightning_det.models.postprocess import Decoder, PaddedDetections
from lightning_det.models.transfer import ClassRows
from lightning_det.optim import parameter_groups

log = logging.getLogger(__name__)
HALF_TYPES = (torch.bfloat16, torch.float16)  # what mixed precision computes in


# Metric results that are per class or per threshold, never logged as one scalar (even with a single class).
PER_CLASS_RESULTS = ("AP_per_class", "pr_counts")

# A factory given as a Hydra config (``{"_target_": ..., "_partial_": True, ...}``) or as the callable itself.
# Configs keep checkpoints plain data, so they load with ``torch.load(weights_only=True)``.
Factory = Union[Mapping[str, Any], Callable[..., Any]]


def as_callable(factory: Factory) -> Callable[..., Any]:
    return instantiate(dict(factory)) if isinstance(factory, Mapping) else factory


def to_original_pixels(boxes: Tensor, image_index: Tensor, meta: dict[str, Any]) -> Tensor:
    """Undo the batch transform: ``x_orig = (x - pad_x) / scale_x`` for boxes ``[K, 4]`` of images ``image_index``.

    Boxes are clipped to their original image, so a detection in the letterbox padding cannot score outside it.
    """
    offset = meta["pad"][image_index].repeat(1, 2)
    factor = meta["scale"][image_index].repeat(1, 2)
    return clip_to_images((boxes - offset) / factor, image_index, meta["orig_size"])


def labels_to_targets(labels: Tensor, meta: dict[str, Any]) -> Detections:
    """Padded ``[B, P, 6]`` batch labels -> per-image metric targets in original-image pixels, with their image id
    (so a metric can count an image repeated by a distributed sampler once)."""
    valid = Labels.of(labels).valid
    image_index = valid.nonzero()[:, 0]
    rows = Labels.present(labels)
    boxes = to_original_pixels(rows.boxes, image_index, meta)
    counts = valid.sum(1).tolist()
    targets = [
        {"boxes": b, "labels": c.long(), "difficult": d > 0, "image_id": i}
        for b, c, d, i in zip(boxes.split(counts), rows.classes.split(counts), rows.difficult.split(counts),
                              meta["image_id"])
    ]
    for target, area in zip(targets, meta.get("area", [])):  # COCO's own object areas, for its size ranges
        if area is not None:
            target["area"] = area
    return targets


def summary_values(results: dict[str, Tensor]) -> dict[str, Tensor]:
    """A validation metric's one-number results as ``val/<name>`` (per-class and curve tensors left out)."""
    return {f"val/{k}": v.float() for k, v in results.items() if k not in PER_CLASS_RESULTS and v.numel() == 1}


class NonFiniteLossError(RuntimeError):
    """Raised by ``train.run`` when a run was stopped because its loss became NaN or infinite."""


class Detector(L.LightningModule):
    """Base class of every detector; see the module docstring for the hooks a subclass implements."""

    #: Settings a family renamed or moved into a part, ``old key -> new path`` under ``model.``: a config or
    #: command line still using the old key is refused with the new one (see ``checks.config.check_renamed``).
    renamed: ClassVar[dict[str, str]] = {}
    #: The input normalisation ``(pixel - mean) / std`` in pixel units (0..255) when none is configured.
    default_pixel_mean: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    default_pixel_std: ClassVar[tuple[float, float, float]] = (255.0, 255.0, 255.0)
    #: Why an exported graph of this family takes only the batch size it was traced with (``None``: any).
    export_batch_fixed: ClassVar[str | None] = None
    #: ``data.img_size`` must be a multiple of this (1: any size): a grid of stride s covers ``img_size // s * s``
    #: pixels, so a family predicting on fixed-stride grids declares its coarsest stride.
    input_multiple: ClassVar[int] = 1
    #: ``trainer.precision: auto`` trains this family in bf16 on a CPU with bf16 instructions: true where that was
    #: measured faster than float32 (``python bench/train_step.py --precision``; SSDLite's depthwise convolutions
    #: were 1.10x slower).
    cpu_bf16: ClassVar[bool] = False
    #: The strings a constructor parameter accepts, ``parameter -> choices``: the config check refuses another
    #: (``checks.config``) before anything is built. Parts and DataModules declare theirs the same way.
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    #: Two parts every family builds from its config (``model.loss``, ``model.decoder``): what ``loss`` and
    #: ``decode`` call, and what TTA and export read (``decoder.max_detections``, ``decoder.class_agnostic``).
    criterion: Loss
    decoder: Decoder

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        optimizer: Factory | None = None,
        scheduler: Factory | None = None,
        metric: Factory | None = None,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        mean = self.default_pixel_mean if pixel_mean is None else pixel_mean
        std = self.default_pixel_std if pixel_std is None else pixel_std
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names given for num_classes={num_classes}")
        self.optimizer_factory = as_callable(optimizer) if optimizer else None
        self.scheduler_factory = as_callable(scheduler) if scheduler else None
        self.val_metric: nn.Module | None = (
            as_callable(metric)(num_classes=num_classes, class_names=self.class_names) if metric else None
        )
        self.nonfinite_loss: str | None = None
        # The last validation's metric results (per-class AP, PR counts ...), read by ValidationSummary.
        self.validation_results: dict[str, Tensor] | None = None
        self.checkpoint_epoch: int | None = None  # set when weights come from a checkpoint
        # The evaluation transform's config, saved with checkpoints so inference needs no training config.
        self.inference_pipeline: dict[str, Any] | None = None
        # Set by evaluate / predict with tta=true (``models/tta.py``): test and predict steps then decode the batch
        # in several augmented views and merge their detections. Never a hyper-parameter: a tool's choice.
        self.tta: Callable[[Detector, dict[str, Any]], Detections] | None = None

    # --- hooks a subclass implements -------------------------------------------------------------------------
    @classmethod
    def fit_to_data(cls, arguments: dict[str, Any], records: list, img_size: int, seed: int = 0) -> dict[str, Any]:
        """The constructor ``arguments`` with data-dependent settings resolved from the training records (YOLO's
        ``anchors: auto``), before the network is built; the default changes nothing."""
        return arguments

    @classmethod
    def fit_to_weights(cls, arguments: dict[str, Any], recorded: dict[str, Any]) -> dict[str, Any]:
        """The constructor ``arguments`` with the settings ``init_from`` weights were trained with, resolved before
        ``fit_to_data`` so the data does not refit them (YOLO's ``anchors: auto``). ``recorded``: what the weights
        say of themselves (``models.weights.recorded_settings``); the default changes nothing."""
        return arguments

    def loss(self, outputs: Any, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, outputs: Any, batch: dict[str, Any]) -> Detections:
        raise NotImplementedError

    def decode_padded(self, outputs: Any, image_size: tuple[int, int]) -> PaddedDetections:
        """``decode`` as fixed-shape tensors, written with tensor operations only so it traces into ONNX."""
        raise NotImplementedError(f"{type(self).__name__} cannot be exported: it has no fixed-shape decoding")

    def load_foreign_weights(self, path: str, cutoff: int | None = None) -> dict[str, Any]:
        """``init_from`` for a file that is not a PyTorch one; returns what was read, for the log."""
        raise ValueError(f"init_from: {path} is not a PyTorch file and {type(self).__name__} reads no other format")

    def class_rows(self) -> dict[str, ClassRows]:
        """The class-indexed tensors (state-dict names) and how their first dimension lays out the classes, so
        ``init_from`` can carry a pretrained head over to other classes (``models/transfer.py``)."""
        return {}

    def from_torchvision(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A torchvision COCO detector's state dict (``init_from=torchvision:<weights>``) in this model's tensor
        names. The model was built for the source's classes, so every tensor keeps its shape; a tensor the source
        lacks raises ``KeyError`` with its torchvision name."""
        raise NotImplementedError(f"{type(self).__name__} loads no torchvision detector")

    def training_matrices(self) -> dict[str, Tensor]:
        """Matrices the family accumulates over a training epoch (``tag -> [N, N]`` counts, rows the truth), drawn
        as heat maps by the image logger at the epoch's end: Faster R-CNN's RPN and RoI confusion. None here."""
        return {}

    # --- the shared loop -------------------------------------------------------------------------------------
    def normalise(self, images: Tensor, image_size: Tensor | None = None) -> Tensor:
        """Pixels (0..255) -> the network's input. Given each image's ``image_size`` (h, w) inside a padded batch,
        the padding is 0 after normalising, as torchvision's ``GeneralizedRCNNTransform`` pads."""
        images = (images - self.pixel_mean) / self.pixel_std
        height, width = images.shape[-2:]
        if image_size is None or bool((image_size == image_size.new_tensor([height, width])).all()):
            return images
        rows = torch.arange(height, device=images.device) < image_size[:, :1].to(images.device)  # [B, H]
        cols = torch.arange(width, device=images.device) < image_size[:, 1:].to(images.device)  # [B, W]
        return images * (rows[:, None, :, None] & cols[:, None, None, :])

    def network_outputs(self, batch: dict[str, Any]) -> Any:
        """``forward`` on the batch's normalised images, its half-precision outputs in float32: under mixed precision
        the loss and the box decoding keep full precision (a bf16 coordinate near 512 px is off by up to 2 px)."""
        outputs = self(self.normalise(batch["images"], batch.get("meta", {}).get("image_size")))
        return tree_map_only(Tensor, lambda t: t.float() if t.dtype in HALF_TYPES else t, outputs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        losses = self.loss(self.network_outputs(batch), batch)
        if not torch.isfinite(losses["loss"]):
            return self._stop_on_nonfinite(losses)
        self._log_losses("train", losses, batch_size=batch["images"].shape[0])
        return losses["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Detections] | None:
        """Returns the batch's detections and targets (original pixels) for callbacks such as the results report.
        In float32 under any mixed precision, as are test and predict (:meth:`full_precision`)."""
        with self.full_precision():
            return self._validation_step(batch)

    def _validation_step(self, batch: dict[str, Any]) -> dict[str, Detections] | None:
        outputs = self.network_outputs(batch)
        self._log_losses("val", self.loss(outputs, batch), batch_size=batch["images"].shape[0])
        if self.val_metric is None:
            return None
        detections = self.detections_in_original_pixels(outputs, batch)
        targets = labels_to_targets(batch["labels"], batch["meta"])
        self.val_metric.update(detections, targets)
        return {"detections": detections, "targets": targets}

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Detections:
        """Detections in original pixels, for ``evaluate``'s callback to score and write (losses need labels
        that a test split may not have)."""
        with self.full_precision():
            return self.inference_detections(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Detections:
        with self.full_precision():
            return self.inference_detections(batch)

    def full_precision(self) -> torch.autocast:
        """Autocast off: mixed precision speeds the training step only. Scores computed in bf16 change with the
        batch's size and composition (another rank count, another batch size); in float32 validation, ``evaluate``
        and ``predict`` give the same detections however the images are batched."""
        return torch.autocast(self.device.type, enabled=False)

    def inference_detections(self, batch: dict[str, Any]) -> Detections:
        """The batch's detections in original pixels: decoded once, or over ``self.tta``'s views when it is set."""
        if self.tta is None:
            return self.detections_in_original_pixels(self.network_outputs(batch), batch)
        return self.in_original_pixels(self.tta(self, batch), batch)

    def detections_in_original_pixels(self, outputs: Any, batch: dict[str, Any]) -> Detections:
        return self.in_original_pixels(self.decode(outputs, batch), batch)

    def in_original_pixels(self, detections: Detections, batch: dict[str, Any]) -> Detections:
        """Batch-pixel detections -> original-image pixels (each dict's boxes replaced)."""
        counts = [len(d["boxes"]) for d in detections]
        image_index = torch.arange(len(counts), device=self.device).repeat_interleave(
            torch.tensor(counts, device=self.device)
        )
        boxes = torch.cat([d["boxes"] for d in detections]) if detections else torch.zeros(0, 4, device=self.device)
        for det, mapped in zip(detections, to_original_pixels(boxes, image_index, batch["meta"]).split(counts)):
            det["boxes"] = mapped
        return detections

    def on_validation_epoch_end(self) -> None:
        if self.val_metric is None:
            return
        results = self.val_metric.compute()
        self.val_metric.reset()
        self.validation_results = results
        per_class = results.get("AP_per_class")
        scalars = summary_values(results)
        self.log_dict(scalars, sync_dist=False)
        undefined = [name for name, value in scalars.items() if value.isnan()]
        if undefined and not self.trainer.sanity_checking:
            log.warning("%s logged as NaN at epoch %d: no validation image holds a (non-difficult) object, so there "
                        "is nothing to score. Such an epoch is never the best checkpoint and counts as no "
                        "improvement for early stopping; add annotated images to the validation split",
                        ", ".join(undefined), self.current_epoch)
        if per_class is not None:
            self.log_dict(
                {f"val_AP/{name}": ap for name, ap in zip(self.class_names, per_class.float()) if not ap.isnan()}
            )

    def scored_epoch(self) -> int:
        """The epoch of the weights being validated: a checkpoint's own when ``validate`` loaded one (the final
        re-validation of the best), else the current one."""
        validating_a_checkpoint = self.trainer.state.fn == "validate" and self.checkpoint_epoch is not None
        return self.checkpoint_epoch if validating_a_checkpoint else self.current_epoch

    def _log_losses(self, stage: str, losses: dict[str, Tensor], batch_size: int) -> None:
        on_step = stage == "train"
        self.log_dict(
            {f"{stage}/{name}": value.detach() for name, value in losses.items()},
            on_step=on_step,
            on_epoch=True,
            prog_bar=on_step,
            batch_size=batch_size,
            # validation losses are averaged over every rank; training ones are rank zero's (an all-reduce per
            # step and term would cost more than the exact mean is worth; Lightning warns about it under DDP)
            sync_dist=not on_step,
        )

    def _stop_on_nonfinite(self, losses: dict[str, Tensor]) -> None:
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        self.nonfinite_loss = (
            f"loss became non-finite at epoch {self.current_epoch}, global step {self.global_step} ({terms}). "
            "Training stopped. Lower optimizer.lr, lengthen the warm-up, or check the labels of this batch."
        )
        log.error(self.nonfinite_loss)
        self.trainer.should_stop = True
        return None

    # --- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["detector_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["inference_pipeline"] = self.inference_pipeline

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.inference_pipeline = checkpoint.get("inference_pipeline")
        self.checkpoint_epoch = checkpoint.get("epoch")

    # --- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError("no optimizer configured: pass a Hydra partial such as conf/optimizer/sgd.yaml")
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(parameter_groups(self, weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        scheduler = self.scheduler_factory(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        if isinstance(scheduler, list):  # plateau: Lightning configs of its warm-up and its per-epoch reduction
            return [optimizer], scheduler
        if not isinstance(scheduler, dict):  # per-iteration schedules
            scheduler = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
