"""init_from with another class list: which classes carry over (init_classes), the head rows they take, and the
pretrained model a user evaluates without training."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from runs import TINY, small_sample, train

from lightning_det.models.transfer import COCO_80, TORCHVISION_COCO, ClassRows, match_classes, transfer_rows
from lightning_det.models.weights import initialise_from
from lightning_det.models.yolov3 import YOLOv3
from lightning_det.models.yolov3.darknet_weights import save_darknet_weights


def test_names_synonyms_and_plurals_find_the_coco_class():
    ours = ["people", "Motorbike", "cars", "buses", "traffic_light", "tvmonitor", "penguin"]
    rows, sentence = match_classes(ours, TORCHVISION_COCO[1:], 90, "by_name")
    found = [None if row is None else TORCHVISION_COCO[1:][row] for row in rows]
    assert found == ["person", "motorcycle", "car", "bus", "traffic light", "tv", None]
    assert "6 of your 7 classes keep the source's head rows" in sentence and "initialised fresh: penguin" in sentence


def test_auto_keeps_the_same_classes_in_any_order_and_reinitialises_others():
    rows, sentence = match_classes(list(reversed(COCO_80)), TORCHVISION_COCO[1:], 90, "auto")
    assert [TORCHVISION_COCO[1:][row] for row in rows] == list(reversed(COCO_80))  # "N/A" rows skipped
    assert sentence.startswith("class head kept")
    rows, sentence = match_classes(["dog", "fish"], COCO_80, 80, "auto")
    assert rows == [None, None]
    assert sentence.startswith("class head re-initialised")
    assert "init_classes=by_name would keep the rows of dog" in sentence
    rows, _ = match_classes(["a", "b"], None, 2, "auto")  # a file without names: kept only at the same count
    assert rows == [0, 1]
    with pytest.raises(ValueError, match="init_classes=everything: use auto or by_name"):
        match_classes(["a"], ["a"], 1, "everything")


def test_class_rows_by_hand():
    """Two anchors, a background row each, a source of 3 classes, a target of 2 (the source's class 2, then a
    fresh one): target rows 0, 1 | 3, 4 take source rows 0, 3 | 4, 7."""
    layout = ClassRows(groups=2, lead=1)
    target, source = layout.rows(3, [2, None])
    assert target.tolist() == [0, 1, 3, 4] and source.tolist() == [0, 3, 4, 7]
    theirs = torch.arange(8.0).view(8, 1)
    fresh = torch.full((6, 1), -1.0)
    assert transfer_rows(fresh, theirs, layout, [2, None]).flatten().tolist() == [0, 3, -1, 4, 7, -1]
    boxes = ClassRows(lead=4, per_class=4)  # Faster R-CNN's per-class boxes, background first
    assert boxes.class_count(4 * 91) == 90
    assert boxes.rows(90, [0])[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def coco_tiny_with_a_dog(seed: int = 0) -> YOLOv3:
    """A yolov3-tiny (narrow) for COCO's 80 classes whose random head calls everything a dog, confidently."""
    torch.manual_seed(seed)
    model = YOLOv3(variant="tiny", width=0.125, num_classes=80, class_names=COCO_80, anchors="default")
    with torch.no_grad():
        for conv in (model.network.output32[1].conv, model.network.output16[1].conv):
            bias = conv.bias.view(3, 85)
            bias[:, 4] = 2.0
            bias[:, 5:] = -20.0  # no other class passes the score threshold
            bias[:, 5 + COCO_80.index("dog")] = 4.0
    return model.eval()


def detections(model: YOLOv3, images: torch.Tensor) -> list[dict]:
    """Decoded with NMS across classes: only one class scores here, and suppression per class would offset the
    boxes by the class index (16 for COCO's dog, 1 here), whose rounding can flip an IoU at the threshold."""
    model.decoder.class_agnostic = True
    with torch.no_grad():
        return model.decode(model(model.normalise(images)), {"images": images})


def in_order(found: dict) -> torch.Tensor:
    """Detections as ``[score, x1, y1, x2, y2]`` rows sorted by all five, so tied scores compare as a set."""
    rows = torch.cat((found["scores"][:, None], found["boxes"]), 1).tolist()
    return torch.tensor(sorted(rows))


def test_a_darknet_coco_file_by_name_finds_a_coco_class_before_any_training(tmp_path):
    source = coco_tiny_with_a_dog()
    save_darknet_weights(source.network, tmp_path / "yolov3-tiny.weights")
    images = torch.rand(2, 3, 128, 128) * 255
    expected = detections(source, images)
    assert all((d["labels"] == COCO_80.index("dog")).all() for d in expected)
    assert sum(len(d["boxes"]) for d in expected) > 0

    ours = YOLOv3(variant="tiny", width=0.125, num_classes=2, class_names=["cat", "dogs"], anchors="default")
    report = initialise_from(ours, tmp_path / "yolov3-tiny.weights", classes="by_name")
    assert "cat <- cat, dogs <- dog" in report.classes
    for got, want in zip(detections(ours.eval(), images), expected):
        assert (got["labels"] == 1).all()  # "dogs", found untrained
        torch.testing.assert_close(in_order(got), in_order(want))  # random weights saturate: scores tie at 1.0

    fresh = YOLOv3(variant="tiny", width=0.125, num_classes=2, class_names=["cat", "dogs"], anchors="default")
    report = initialise_from(fresh, tmp_path / "yolov3-tiny.weights")  # auto: other classes, a fresh head
    assert report.classes.startswith("class head re-initialised")
    head = fresh.network.output32[1].conv.bias.view(3, 7)
    assert not torch.equal(head[:, 5:], source.network.output32[1].conv.bias.view(3, 85)[:, 5:7])


def test_faster_rcnn_rows_follow_the_class_names():
    from lightning_det.models.faster_rcnn import FasterRCNN
    from lightning_det.models.weights import Pretrained, load_pretrained

    def small(num_classes: int, names: list[str]) -> FasterRCNN:
        return FasterRCNN(backbone="mobilenet_v3_fpn", width=0.25, fpn_channels=16, representation=32,
                          num_classes=num_classes, class_names=names)

    torch.manual_seed(0)
    source = small(90, TORCHVISION_COCO[1:]).state_dict()
    model = small(3, ["Person", "motorbike", "fish"])
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_pretrained(model, Pretrained(source, TORCHVISION_COCO[1:], "coco", whole=True), classes="by_name")
    state = model.state_dict()
    person, motorcycle = TORCHVISION_COCO.index("person"), TORCHVISION_COCO.index("motorcycle")  # source rows
    scores, boxes = "roi_head.predictor.cls_score.weight", "roi_head.predictor.bbox_pred.weight"
    assert torch.equal(state[scores][:3], source[scores][[0, person, motorcycle]])
    assert torch.equal(state[scores][3], fresh[scores][3])
    assert torch.equal(state[boxes][8:12], source[boxes][4 * motorcycle: 4 * motorcycle + 4])
    assert torch.equal(state[boxes][12:], fresh[boxes][12:])


def evaluated(cfg: DictConfig) -> list[dict]:
    """``python -m lightning_det.tools.evaluate`` on ``cfg`` in this process; its ``coco_results.json``."""
    from lightning_det.tools.evaluate import evaluate

    evaluate(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "coco_results.json").read_text())


def test_evaluate_scores_init_from_weights_as_it_scores_their_checkpoint(tmp_path, cfg_eval):
    """``evaluate init_from=<weights> model=<config>`` (pretrained weights, not trained here) gives the detections
    ``evaluate ckpt_path=`` gives for a checkpoint holding the same weights: as a checkpoint and as Darknet's file."""
    sample = small_sample(tmp_path)
    train(tmp_path, *sample, "trainer.max_epochs=1", "model.anchors=default")
    checkpoint = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    darknet = tmp_path / "trained.weights"
    save_darknet_weights(YOLOv3.load_from_checkpoint(checkpoint, map_location="cpu").network, darknet)
    data = [*TINY, *sample]
    expected = evaluated(cfg_eval(f"ckpt_path={checkpoint}", *data, run="checkpoint"))
    assert expected
    for name, weights in (("init_from_checkpoint", checkpoint), ("init_from_darknet", darknet)):
        results = evaluated(cfg_eval(f"init_from={weights}", *data, run=name))
        assert len(results) == len(expected), name
        for one, two in zip(expected, results):
            assert (one["image_id"], one["category_id"]) == (two["image_id"], two["category_id"])
            assert one["score"] == pytest.approx(two["score"], abs=1e-5)
            assert one["bbox"] == pytest.approx(two["bbox"], abs=0.02)
