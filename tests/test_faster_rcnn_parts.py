"""Faster R-CNN's parts come from its config: a part is swapped by a command-line override, and a setting that
moved into a part is refused under its old name with the new one."""

from __future__ import annotations

import pytest
import torch

from lightning_det.checks.config import ConfigValueError, check_config, check_renamed_overrides
from lightning_det.models.faster_rcnn import FasterRCNN
from lightning_det.models.faster_rcnn.decode import FasterRCNNDecoder
from lightning_det.models.faster_rcnn.targets import FasterRCNNAssigner
from lightning_det.tools.inference import upgraded
from lightning_det.tools.train import build_model

MODEL = "model=faster_rcnn_mobilenet"


class RecordingDecoder(FasterRCNNDecoder):
    """The default decoder that also counts its calls: the stand-in for a user's own decoder."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def test_a_decoder_swapped_on_the_command_line_is_the_one_that_decodes(cfg_train):
    cfg = cfg_train(MODEL, f"model.decoder._target_={__name__}.RecordingDecoder", "model.decoder.max_detections=7")
    check_config(cfg)
    detector = build_model(cfg, num_classes=2, class_names=["a", "b"]).eval()
    assert type(detector.decoder) is RecordingDecoder
    assert detector.decoder.max_detections == 7 and detector.decoder.score_thresh == 0.05  # the config's settings
    assert detector.hparams["decoder"]["_target_"] == f"{__name__}.RecordingDecoder"  # plain data in checkpoints
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        detections = detector.decode(detector(images), {"images": images})
    assert detector.decoder.calls == 1
    assert 0 < len(detections[0]["boxes"]) <= 7


def test_the_sample_tuning_changes_only_its_own_keys_of_a_part(cfg_train):
    detector = build_model(cfg_train(MODEL), num_classes=2, class_names=["a", "b"])  # the sample data: tuned
    assert type(detector.decoder) is FasterRCNNDecoder and type(detector.assigner) is FasterRCNNAssigner
    assert detector.rpn.max_detections == (300, 100)  # conf/tuned/sample_faster_rcnn_mobilenet.yaml
    assert detector.rpn.nms_thresh == 0.7 and detector.assigner.rpn_batch_size == 256  # the model config's
    assert cfg_train(MODEL, "data=voc").model.rpn.max_detections == [2000, 150]


@pytest.mark.parametrize("old, value, new", [
    ("rpn_post_nms_top_n", "[300,100]", "rpn.max_detections"),
    ("detections_per_image", "50", "decoder.max_detections"),
    ("roi_pooling", "pool", "roi_head.pooling"),
])
def test_an_old_key_is_refused_with_its_new_name(cfg_train, old, value, new):
    message = f"model.{old} was renamed: use model.{new}"
    with pytest.raises(ConfigValueError, match=message):
        check_renamed_overrides([f"model.{old}={value}"])
    cfg = cfg_train(MODEL, f"+model.{old}={value}")  # the old key in a model config of one's own
    with pytest.raises(ConfigValueError, match=message):
        check_config(cfg)


def test_a_checkpoint_of_the_flat_layout_rebuilds_with_its_settings_in_their_parts():
    flat = {"backbone": "mobilenet_v3_fpn", "representation": 64, "anchor_sizes": [[16, 32]] * 3,
            "rpn_post_nms_top_n": [50, 30], "roi_batch_size": 32, "rpn_sigma": 2.0, "detections_per_image": 7,
            "num_classes": 2, "frozen_bn_eps": 0.0, "frozen_blocks": 3}
    arguments, _ = upgraded(FasterRCNN, flat, {})
    model = FasterRCNN(**arguments)
    assert model.rpn.max_detections == (50, 30) and model.rpn.anchor_generator.sizes == ((16, 32),) * 3
    assert model.assigner.roi_batch_size == 32 and model.criterion.rpn_sigma == 2.0
    assert model.decoder.max_detections == 7 and model.roi_head.predictor.cls_score.in_features == 64
    assert arguments["frozen"] == {"bn_eps": 0.0, "blocks": 3}
