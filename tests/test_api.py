"""The Python API (``lightning_det.load / train / evaluate / export``) called as a user's program calls it, checked
against the command-line tools on the same checkpoint: the CLI is the reference."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from PIL import Image
from runs import QUICK_RUN, REPO, assert_same_results, command

import lightning_det
from lightning_det.api.jobs import override_list
from lightning_det.api.predictor import SCORE_THRESH

#: A tiny run (about a second an epoch) with ``data.batch_size=auto``: on a CPU, the data config's default.
TINY = {**dict(item.split("=", 1) for item in QUICK_RUN if "=" in item), "~callbacks.image_logger": None,
        "data.batch_size": "auto", "trainer.max_epochs": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny training through ``lightning_det.train`` from a working directory outside the clone, then the CLI's
    predict and evaluate on its checkpoint (the references)."""
    tmp = tmp_path_factory.mktemp("api")
    hydra_before = HydraConfig.instance().cfg
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        result = lightning_det.train({**TINY, "data.root": str(tmp / "sample")})
    images = tmp / "images"
    images.mkdir()
    voc = tmp / "sample" / "VOCsample"
    for stem in (voc / "ImageSets" / "Main" / "val.txt").read_text().split()[:3]:
        (images / f"{stem}.jpg").write_bytes((voc / "JPEGImages" / f"{stem}.jpg").read_bytes())
    checkpoint = result.best_model_path
    command("-m", "lightning_det.tools.predict", f"ckpt_path={checkpoint}", f"input={images}", "score_thresh=0.0",
            f"hydra.run.dir={tmp / 'predict'}")
    data = [f"data.root={tmp / 'sample'}", "data.reading.prepare.num_train=16", "data.reading.prepare.num_val=4",
            "data.loader.num_workers=0", "data.loader.persistent_workers=false"]
    evaluated = command("-m", "lightning_det.tools.evaluate", f"ckpt_path={checkpoint}", *data,
                        f"hydra.run.dir={tmp / 'evaluate'}")
    return {"tmp": tmp, "result": result, "images": images, "data": data, "evaluate_output": evaluated.stdout
            + evaluated.stderr, "hydra_before": hydra_before}


def test_train_runs_in_the_commands_run_folder_and_reports_its_best(trained):
    tmp, result = trained["tmp"], trained["result"]
    assert result.run_dir.parent == tmp / "logs" / "train" / "runs"  # paths.log_dir under the caller's directory
    assert result.best_model_path.is_file() and result.best_model_path.parent == result.run_dir / "checkpoints"
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert result.best_score == pytest.approx(final["val/mAP"]) and result.metrics["val/mAP"] == result.best_score
    assert OmegaConf.load(result.run_dir / ".hydra" / "overrides.yaml")[0].startswith("model=yolov3_tiny")
    resolved = OmegaConf.load(result.run_dir / "config_resolved.yaml")
    assert resolved.paths.output_dir == str(result.run_dir) and resolved.trainer.max_epochs == 2
    assert HydraConfig.instance().cfg is trained["hydra_before"]  # the caller's Hydra state is left as it was


def test_auto_batch_size_on_a_cpu_keeps_the_data_configs_default(trained):
    run_dir = trained["result"].run_dir
    assert OmegaConf.load(run_dir / "config_resolved.yaml").data.batch_size == 8
    assert "data.batch_size=auto: no CUDA device to search on, so the data config's default is kept: 8" in (
        run_dir / "train.log").read_text()


def test_the_run_folders_log_holds_the_data_modules_decisions(trained):
    """What the DataModule read and chose (images, objects, classes; the input size, the repeats) is in train.log,
    not on the console alone: a run folder must say how its data was read."""
    text = (trained["result"].run_dir / "train.log").read_text()
    assert re.search(r"lightning_det\.data\.datamodule\]\[INFO\] - train: \d+ images, \d+ objects, \d+ classes", text)


def test_predict_on_a_folder_gives_the_clis_detections(trained):
    expected = json.loads((trained["tmp"] / "predict" / "detections.json").read_text())
    predictions = lightning_det.load(trained["result"].best_model_path).predict(trained["images"], score_thresh=0.0)
    assert [p.source for p in predictions] == list(expected)
    for prediction in predictions:
        reference = expected[prediction.source]
        assert len(reference["scores"]) > 0 and prediction.names == reference["labels"]
        assert np.allclose(prediction.boxes.numpy(), reference["boxes"], atol=1e-4)
        assert np.allclose(prediction.scores.numpy(), reference["scores"], atol=1e-6)
        width, height = Image.open(prediction.source).size
        assert prediction.image_size == (height, width)


def same(one: lightning_det.Prediction, two: lightning_det.Prediction) -> bool:
    return (torch.equal(one.labels, two.labels) and torch.allclose(one.boxes, two.boxes, atol=1e-4)
            and torch.allclose(one.scores, two.scores, atol=1e-6))


def test_a_path_pil_image_array_and_tensor_of_one_image_give_the_same_detections(trained):
    detector = lightning_det.load(trained["result"].best_model_path)
    path = min(trained["images"].iterdir())
    array = np.array(Image.open(path).convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    from_path = detector.predict(path, score_thresh=0.0)
    assert len(from_path) == 1 and len(from_path[0].scores) > 0
    for source in (str(path), Image.open(path), array, tensor, tensor[None], [tensor]):
        prediction = detector(source, score_thresh=0.0)
        assert len(prediction) == 1 and same(prediction[0], from_path[0]), type(source)
    batch = detector.predict([array, tensor, path], score_thresh=0.0, batch_size=2)
    assert [p.source for p in batch] == ["image0", "image1", str(path)] and all(same(p, from_path[0]) for p in batch)
    with pytest.raises(ValueError, match="uint8"):
        detector.predict(tensor.float() / 255)


def test_an_argument_that_is_no_image_is_refused_before_any_file_is_decoded(trained, monkeypatch):
    import lightning_det.tools.predict as predict_module

    decoded = []
    monkeypatch.setattr(predict_module, "decode_rgb", decoded.append)
    with pytest.raises(TypeError, match="cannot read an image from a value of type int: give a path"):
        lightning_det.load(trained["result"].best_model_path).predict([trained["images"], 42])
    assert decoded == []


def test_decoding_overrides_apply_to_one_call(trained):
    detector = lightning_det.load(trained["result"].best_model_path)
    images = trained["images"]
    everything = detector.predict(images, score_thresh=0.0)
    threshold = float(everything[0].scores.median())
    above = detector.predict(images, score_thresh=threshold)
    for full, kept in zip(everything, above):
        mask = full.scores >= threshold
        assert 0 < len(kept.scores) < len(full.scores) and torch.equal(kept.scores, full.scores[mask])
    default = detector.predict(images)  # the CLI's threshold
    assert [len(p.scores) for p in default] == [int((p.scores >= SCORE_THRESH).sum()) for p in everything]
    decoder = detector.model.decoder
    settings = (decoder.max_detections, decoder.nms_thresh)
    top = detector.predict(images, score_thresh=0.0, max_detections=5)
    assert all(torch.equal(t.scores, full.scores[:5]) for t, full in zip(top, everything))
    looser = detector.predict(images, score_thresh=0.0, nms_thresh=0.95)
    assert sum(len(p.scores) for p in looser) > sum(len(p.scores) for p in everything)
    assert (decoder.max_detections, decoder.nms_thresh) == settings  # restored after each call
    assert all(same(a, b) for a, b in zip(detector.predict(images, score_thresh=0.0), everything))
    with pytest.raises(ValueError, match="no decoding setting iou"):
        detector.predict(images, iou=0.5)


def test_test_time_augmentation_gives_the_clis_tta_detections(trained):
    tmp = trained["tmp"]
    checkpoint = trained["result"].best_model_path
    command("-m", "lightning_det.tools.predict", f"ckpt_path={checkpoint}", f"input={trained['images']}",
            "score_thresh=0.0", "tta=true", f"hydra.run.dir={tmp / 'predict_tta'}")
    expected = json.loads((tmp / "predict_tta" / "detections.json").read_text())
    detector = lightning_det.load(checkpoint)
    merged = detector.predict(trained["images"], score_thresh=0.0, tta=True)
    plain = detector.predict(trained["images"], score_thresh=0.0)  # tta holds for its call only
    assert [p.source for p in merged] == list(expected)
    for prediction, alone in zip(merged, plain):
        reference = expected[prediction.source]
        assert prediction.names == reference["labels"] and not same(prediction, alone)
        assert np.allclose(prediction.boxes.numpy(), reference["boxes"], atol=1e-4)
        assert np.allclose(prediction.scores.numpy(), reference["scores"], atol=1e-6)
    plain_cli = json.loads((tmp / "predict" / "detections.json").read_text())
    assert all(np.allclose(p.scores.numpy(), plain_cli[p.source]["scores"], atol=1e-6) for p in plain)


def test_a_folder_is_decoded_once_and_read_again_only_to_draw(trained, monkeypatch):
    import lightning_det.api.predictor as predictor_module
    import lightning_det.tools.predict as predict_module

    decoded, decode = [], predict_module.decode_rgb

    def counting(path):
        decoded.append(path)
        return decode(path)

    monkeypatch.setattr(predict_module, "decode_rgb", counting)
    monkeypatch.setattr(predictor_module, "decode_rgb", counting)
    predictions = lightning_det.load(trained["result"].best_model_path).predict(trained["images"], batch_size=2)
    assert sorted(decoded) == sorted(trained["images"].iterdir())  # each file once, not also to list it
    predictions[0].plot()
    assert len(decoded) == 4 and str(decoded[-1]) == predictions[0].source


def test_prediction_helpers_write_coco_results_and_draw(trained):
    detector = lightning_det.load(trained["result"].best_model_path)
    prediction = detector.predict(trained["images"], score_thresh=0.0, max_detections=10)[0]
    assert len(prediction.scores) > 0
    results = prediction.to_coco(image_id=7, category_ids=[10, 11, 12, 13, 14, 15])
    assert len(results) == len(prediction.scores)
    for result, box, label in zip(results, prediction.boxes.tolist(), prediction.labels.tolist()):
        assert result["image_id"] == 7 and result["category_id"] == 10 + label
        assert np.allclose(result["bbox"], [box[0], box[1], box[2] - box[0], box[3] - box[1]], atol=0.01)
    drawn = prediction.plot()
    original = np.asarray(Image.open(prediction.source).convert("RGB"))
    assert drawn.dtype == np.uint8 and drawn.shape == original.shape and (drawn != original).any()


def test_evaluate_gives_the_clis_metrics_and_files(trained):
    tmp = trained["tmp"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        metrics = lightning_det.evaluate(trained["result"].best_model_path, trained["data"])
    table = trained["evaluate_output"]
    printed = re.search(r"^mAP\s+(\S+)\s+(\S+)\s+(\S+)", table, re.MULTILINE).groups()
    assert [f"{metrics[name]['mAP']:.4f}" for name in ("voc07", "voc", "coco")] == list(printed)
    assert len(metrics["voc"]["AP_per_class"]) == 6 and "AP50" in metrics["coco"]
    run_dir = next((tmp / "logs" / "evaluate" / "runs").iterdir())
    assert_same_results(json.loads((run_dir / "coco_results.json").read_text()),
                        json.loads((tmp / "evaluate" / "coco_results.json").read_text()))


def test_export_writes_an_onnx_file_with_the_checkpoints_classes(trained):
    tmp = trained["tmp"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        path = lightning_det.export(trained["result"].best_model_path, {"output": str(tmp / "model.onnx")})
    assert path == tmp / "model.onnx" and path.is_file()
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["class_names"]) == lightning_det.load(trained["result"].best_model_path).class_names


def test_the_default_score_threshold_is_the_clis():
    assert OmegaConf.load(REPO / "conf" / "predict.yaml").score_thresh == SCORE_THRESH


def test_mapping_overrides_are_written_in_hydras_grammar():
    assert override_list({"data.classes": None, "trainer.max_epochs": 2, "data.train.splits": ["train", "a b"],
                          "data.reading.skip_invalid": True, "data.root": "/data/my set", "model": "ssdlite"}) == [
        "data.classes=null", "trainer.max_epochs=2", "data.train.splits=[train,'a b']", "data.reading.skip_invalid=true",
        "data.root='/data/my set'", "model=ssdlite"]
    assert override_list({"~callbacks.ema": None}) == ["~callbacks.ema"]
    assert override_list(("model=ssdlite",)) == ["model=ssdlite"]


def test_a_wrong_override_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="did you mean model=yolov3"):
        lightning_det.train(["model=yolo3"])
    with pytest.raises(ValueError, match="conf_thresh was renamed"):
        lightning_det.train(["model.conf_thresh=0.1"])
    assert not (tmp_path / "logs").exists()


def test_importing_the_package_loads_no_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, lightning_det; print('torch' in sys.modules)"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def readme_api_calls() -> list[ast.Call]:
    """The ``lightning_det.<name>(...)`` and ``<detector>.predict(...)`` calls of the README's Python API block."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"Or from Python.*?\n\n((?:    .*\n|\n)+)", text).group(1)
    tree = ast.parse("\n".join(line[4:] for line in block.splitlines()))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]


def test_the_readme_api_block_calls_the_api_as_it_is():
    calls = readme_api_calls()
    functions = {"predict": lightning_det.Predictor.predict, "to_coco": lightning_det.Prediction.to_coco,
                 "plot": lightning_det.Prediction.plot}
    named = {call.func.attr for call in calls}
    assert {"train", "load", "predict", "evaluate", "export"} <= named
    for call in calls:
        if call.func.attr not in functions and not (isinstance(call.func.value, ast.Name)
                                                    and call.func.value.id == "lightning_det"):
            continue
        function = functions.get(call.func.attr) or getattr(lightning_det, call.func.attr)
        parameters = inspect.signature(function).parameters
        assert all(keyword.arg in parameters for keyword in call.keywords), ast.unparse(call)
