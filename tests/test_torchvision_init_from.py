"""init_from=torchvision:<weights name>: read from torch.hub's cache (nothing is downloaded here), loaded whole into
the config built for it, and refused with one message naming the file and what it holds when it does not fit.

The equality of the detections is shown per architecture in tests/test_torchvision_{faster_rcnn,ssd}.py; these
tests drive the entry point a user types."""

import pytest
import torch
import torchvision
from runs import compose_config

from lightning_det.checks.run import check_run
from lightning_det.models.backbones.pretrained import cached_file
from lightning_det.models.torchvision_zoo import TORCHVISION_CONFIGS
from lightning_det.models.transfer import COCO_80, TORCHVISION_COCO
from lightning_det.models.weights import initialise_from
from lightning_det.tools.train import build_model

FRCNN_320 = "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"
SSDLITE = "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"


def cache_random_weights(name: str, builder: str) -> dict[str, torch.Tensor]:
    """A torchvision detector with random weights, saved where torch.hub keeps ``name``'s file."""
    torch.manual_seed(0)
    state = torchvision.models.get_model(builder, weights=None, weights_backbone=None).state_dict()
    path = cached_file(torchvision.models.get_weight(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def model_from(config: str, classes: list[str], *overrides: str):
    cfg = compose_config("train", f"model={config}", *overrides)
    return build_model(cfg, num_classes=len(classes), class_names=classes)


def test_a_weights_name_loads_whole_from_the_offline_keeping_the_rows_of_your_coco_classes(offline):
    source = cache_random_weights(FRCNN_320, "fasterrcnn_mobilenet_v3_large_320_fpn")
    model = model_from("faster_rcnn_mobilenet_320_coco", ["bike", "people", "fish"])
    report = initialise_from(model, f"torchvision:{FRCNN_320}", classes="by_name")

    state = model.state_dict()
    assert torch.equal(state["backbone.fpn.layer_blocks.0.0.weight"], source["backbone.fpn.layer_blocks.0.0.weight"])
    assert torch.equal(state["rpn.head.conv.0.0.weight"], source["rpn.head.conv.0.0.weight"])
    rows = [0, TORCHVISION_COCO.index("bicycle"), TORCHVISION_COCO.index("person")]
    scores = state["roi_head.predictor.cls_score.weight"]
    assert torch.equal(scores[:3], source["roi_heads.box_predictor.cls_score.weight"][rows])
    assert "bike <- bicycle, people <- person" in report.classes and "initialised fresh: fish" in report.classes
    assert not report.skipped_shape and not [n for n in report.missing if "num_batches_tracked" not in n]


def test_the_same_weights_load_from_a_state_dict_file(offline, tmp_path):
    source = cache_random_weights(FRCNN_320, "fasterrcnn_mobilenet_v3_large_320_fpn")
    torch.save(source, tmp_path / "frcnn320.pth")
    model = model_from("faster_rcnn_mobilenet_320_coco", COCO_80)  # a COCO dataset's 80 classes: kept
    report = initialise_from(model, tmp_path / "frcnn320.pth")
    assert report.classes.startswith("class head kept")
    rows = [0] + [TORCHVISION_COCO.index(name) for name in COCO_80]  # torchvision's label ids skip COCO's gaps
    assert torch.equal(model.state_dict()["roi_head.predictor.cls_score.bias"],
                       source["roi_heads.box_predictor.cls_score.bias"][rows])


def test_coco_weights_into_a_model_of_another_width_name_the_tensor_and_both_shapes(offline):
    cache_random_weights(FRCNN_320, "fasterrcnn_mobilenet_v3_large_320_fpn")
    narrow = model_from("faster_rcnn_mobilenet", ["person"])  # the CPU config: width 0.5, a 96-channel FPN
    with pytest.raises(ValueError) as error:
        initialise_from(narrow, f"torchvision:{FRCNN_320}")
    message = str(error.value)
    assert f"init_from=torchvision:{FRCNN_320} (fasterrcnn_mobilenet_v3_large_320_fpn)" in message
    assert "another width or architecture" in message and "is (" in message and "there and (" in message


def test_weights_of_another_architecture_name_the_config_that_holds_them(offline):
    cache_random_weights(SSDLITE, "ssdlite320_mobilenet_v3_large")
    model = model_from("faster_rcnn_mobilenet_320_coco", ["person"])
    with pytest.raises(ValueError, match=f"init_from=torchvision:{SSDLITE} holds torchvision's "
                                         "ssdlite320_mobilenet_v3_large, which FasterRCNN cannot hold .*"
                                         "use model=ssdlite320_coco"):
        initialise_from(model, f"torchvision:{SSDLITE}")


def test_a_missing_or_truncated_cached_file_says_where_it_belongs(offline):
    model = model_from("faster_rcnn_mobilenet_320_coco", ["person"])
    path = cached_file(torchvision.models.get_weight(FRCNN_320))
    with pytest.raises(FileNotFoundError) as error:
        initialise_from(model, f"torchvision:{FRCNN_320}")
    assert f"{path.name} is not in torch's cache" in str(error.value) and str(path) in str(error.value)
    assert f"init_from=/path/to/{path.name}" in str(error.value)

    cache_random_weights(FRCNN_320, "fasterrcnn_mobilenet_v3_large_320_fpn")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"init_from: cannot read {path} as a PyTorch file, it is truncated"):
        initialise_from(model, f"torchvision:{FRCNN_320}")


def test_an_unknown_weights_name_is_refused_before_anything_is_built(cfg_train):
    cfg = cfg_train("init_from=torchvision:ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(ValueError, match="not the weights of a torchvision COCO detector .* use one of .*"
                                         f"torchvision:{SSDLITE}"):
        check_run(cfg)


@pytest.mark.parametrize("builder, config", sorted(TORCHVISION_CONFIGS.items()))
def test_each_config_has_the_parameter_count_torchvision_publishes(builder, config):
    """The count in the weights' metadata (``meta["num_params"]``), for COCO's 90 classes plus background."""
    weights = [w for w in torchvision.models.get_model_weights(builder) if "COCO" in w.name][0]
    model = model_from(config, TORCHVISION_COCO[1:])
    assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"]
