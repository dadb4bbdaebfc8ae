"""The model configs restate their parts' defaults to document them (one comment per key). Where a config
restates a value, it must be the part's own default, so the YAML and the code cannot drift apart silently; the
values a config sets on purpose (another family member's sizes, a recipe's thresholds) are listed here, each
with its reason."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
FASTER_RCNN = [model for model in MODELS if model.startswith("faster_rcnn")]

#: ``(config, part, key)`` set on purpose to another value than the part's default.
CHOSEN = {
    # the network's own sizes: each SSD variant and backbone has its default boxes
    **{(model, "prior", key): "the variant's default boxes" for model in MODELS if model.startswith("ssd")
       for key in ("aspect_ratios", "min_sizes", "max_sizes", "steps", "s_min", "s_max", "clip", "fit_scales")},
    # torchvision's COCO detectors, layer for layer: their decoding and RPN settings
    **{(model, part, key): "torchvision's value" for model in MODELS if model.endswith("_coco")
       for part in ("rpn", "decoder", "roi_head", "prior", "assigner")
       for key in ("pre_nms_topk", "max_detections", "score_thresh", "nms_thresh", "anchor_sizes", "aspect_ratios",
                   "min_size", "pre_nms_topk_per_class", "sampling_ratio", "output_size", "pooling", "s_min",
                   "s_max", "steps", "clip", "min_sizes", "max_sizes", "fit_scales", "positive_iou")},
    # Faster R-CNN's parts default to the VGG16 reference; the FPN members take torchvision's recipe
    **{(model, part, key): "torchvision's FPN recipe" for model in FASTER_RCNN if model != "faster_rcnn_vgg16"
       for part, key in (("rpn", "pre_nms_topk"), ("rpn", "max_detections"), ("roi_head", "sampling_ratio"),
                         ("assigner", "roi_batch_size"), ("loss", "roi_sigma"))},
    **{(model, "rpn", "anchor_sizes"): "one tuple per feature level of the backbone" for model in FASTER_RCNN},
}


def parts(model: str) -> list[tuple[str, dict]]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}"])
    node = OmegaConf.to_container(cfg.model, resolve=True)
    return [(name, value) for name, value in node.items() if isinstance(value, dict) and "_target_" in value]


@pytest.mark.parametrize("model", MODELS)
def test_a_restated_part_default_is_the_parts_own(model):
    drifted = []
    for name, settings in parts(model):
        defaults = {key: parameter.default for key, parameter in
                    inspect.signature(get_class(settings["_target_"])).parameters.items()
                    if parameter.default is not inspect.Parameter.empty}
        for key, value in settings.items():
            if key in defaults and (model, name, key) not in CHOSEN:
                default = defaults[key]
                default = list(default) if isinstance(default, tuple) else default
                if value != default and not (isinstance(value, list) and value == [list(v) if isinstance(v, tuple)
                                                                                    else v for v in default or []]):
                    drifted.append(f"model.{name}.{key}: config {value!r}, code {defaults[key]!r}")
    assert drifted == []
