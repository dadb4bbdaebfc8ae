"""Checkpoints written before the parts layout and the in-model normalisation still load, with the same output."""

import torch

from lightning_det.models.yolov3 import YOLOv3
from lightning_det.tools.inference import load_detector

PIPELINE = {"_target_": "lightning_det.data.transforms.LetterboxTransform", "img_size": 64, "fill": 114}


def save(path, hyper_parameters, pipeline, state_dict):
    torch.save({"state_dict": state_dict, "hyper_parameters": hyper_parameters, "inference_pipeline": pipeline,
                "detector_class": "lightning_det.models.yolov3.module.YOLOv3"}, path)
    return path


def test_an_old_checkpoint_loads_into_the_new_layout_with_the_same_detections(tmp_path):
    torch.manual_seed(0)
    decoder = {"score_thresh": 0.001, "max_detections": 7, "class_agnostic": True}
    model = YOLOv3(variant="tiny", width=0.25, num_classes=2, decoder=decoder).eval()
    current = save(tmp_path / "new.ckpt", dict(model.hparams), PIPELINE, model.state_dict())
    # the same model as the previous release wrote it: flat decoding keys, normalisation in the pipeline
    old_arguments = {k: v for k, v in model.hparams.items() if k not in ("decoder", "pixel_mean", "pixel_std")}
    old_arguments.update(conf_thresh=0.001, nms_topk=7, force_suppress=True)
    old = save(tmp_path / "old.ckpt", old_arguments, {**PIPELINE, "mean": [0.0, 0.0, 0.0], "std": [255.0] * 3},
               model.state_dict())

    (new_model, new_pipeline), (old_model, old_pipeline) = load_detector(current), load_detector(old)
    assert old_model.decoder == new_model.decoder and old_model.decoder.max_detections == 7
    assert torch.equal(old_model.pixel_std, new_model.pixel_std)
    assert vars(old_pipeline) == vars(new_pipeline)
    images = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        expected = new_model.decode(new_model(new_model.normalise(images)), {"images": images})
        got = old_model.decode(old_model(old_model.normalise(images)), {"images": images})
    assert sum(len(d["scores"]) for d in expected) > 0
    for a, b in zip(expected, got):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_with_the_old_assigner_threshold_loads_it_as_positive_iou(tmp_path):
    model = YOLOv3(variant="tiny", width=0.25, num_classes=2, assigner={"positive_iou": 0.35}).eval()
    old_arguments = {**model.hparams, "assigner": {"iou_t": 0.35, "best_anchor_only": True}}
    old = save(tmp_path / "old.ckpt", old_arguments, PIPELINE, model.state_dict())
    loaded, _ = load_detector(old)
    assert loaded.assigner.positive_iou == 0.35 and loaded.assigner.best_anchor_only
    assert old_arguments["assigner"] == {"iou_t": 0.35, "best_anchor_only": True}  # the checkpoint's dict untouched
