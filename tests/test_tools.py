"""evaluate and predict on a checkpoint the tests train, through their real command lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runs import assert_same_results, command

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle", "ring", "cross", "star"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Train briefly at 128 px, then evaluate (asking for 320 px on the command line: the checkpoint's own
    pipeline must win), predict two validation images and export to ONNX."""
    tmp = tmp_path_factory.mktemp("tools")
    data = [f"data.root={tmp / 'sample'}", "data.reading.prepare.num_train=16", "data.reading.prepare.num_val=8",
            "data.loader.num_workers=0", "data.sampler.min_steps_per_epoch=0", "data.loader.persistent_workers=false"]
    command("train.py", "model.width=0.25", "trainer.max_epochs=2", "data.batch_size=4", "data.img_size=128", *data,
            f"paths.log_dir={tmp / 'logs'}", f"hydra.run.dir={tmp / 'run'}")
    checkpoint = next((tmp / "run" / "checkpoints").glob("best-*.ckpt"))
    evaluated = command("-m", "lightning_det.tools.evaluate", f"ckpt_path={checkpoint}", *data, "data.img_size=320",
                        f"hydra.run.dir={tmp / 'evaluate'}")
    (tmp / "evaluate" / "stdout.txt").write_text(evaluated.stdout + evaluated.stderr)
    on_two = command("-m", "lightning_det.tools.evaluate", f"ckpt_path={checkpoint}", *data, "trainer=ddp",
                     "trainer.accelerator=cpu", f"hydra.run.dir={tmp / 'evaluate_ddp'}")
    (tmp / "evaluate_ddp" / "stdout.txt").write_text(on_two.stdout + on_two.stderr)

    voc = tmp / "sample" / "VOCsample"
    inputs = tmp / "inputs"
    inputs.mkdir()
    for stem in (voc / "ImageSets" / "Main" / "val.txt").read_text().split()[:2]:
        (inputs / f"{stem}.jpg").write_bytes((voc / "JPEGImages" / f"{stem}.jpg").read_bytes())
    command("-m", "lightning_det.tools.predict", f"ckpt_path={checkpoint}", f"input={inputs}", "score_thresh=0.0",
            f"hydra.run.dir={tmp / 'predict'}")
    command("-m", "lightning_det.tools.export", f"ckpt_path={checkpoint}", f"output={tmp / 'model.onnx'}", "batch_size=2",
            f"hydra.run.dir={tmp / 'export'}")
    return tmp


def voc_result_scores(folder: Path) -> dict[tuple[str, str], list[float]]:
    scores: dict[tuple[str, str], list[float]] = {}
    for name in CLASSES:
        for line in (folder / f"comp4_det_test_{name}.txt").read_text().splitlines():
            stem, score, x1, y1, x2, y2 = line.split()
            assert float(x1) >= 1.0 and float(y1) >= 1.0 and float(x2) >= float(x1) - 1
            scores.setdefault((stem, name), []).append(float(score))
    return scores


def test_evaluate_prints_every_metric_and_writes_result_files(runs):
    text = (runs / "evaluate" / "stdout.txt").read_text()
    assert re.search(r"class\s+voc07\s+voc\s+coco", text) and "AP50=" in text
    assert all(re.search(rf"^{name}\s", text, re.MULTILINE) for name in CLASSES)
    lines = voc_result_scores(runs / "evaluate" / "voc")
    results = json.loads((runs / "evaluate" / "coco_results.json").read_text())
    assert len(results) == sum(len(v) for v in lines.values()) > 0
    assert all(r["bbox"][2] >= 0 and r["bbox"][3] >= 0 and 0 <= r["category_id"] < 6 for r in results)
    assert "best F1" in text
    for name in ("pr_curve", "f1_curve", "confusion_matrix", "labels"):  # the results report of the scored images
        pixels = np.asarray(Image.open(runs / "evaluate" / f"{name}.png").convert("L"), dtype=np.float64)
        assert min(pixels.shape) >= 200 and pixels.std() > 5, name


def test_evaluate_on_two_processes_scores_every_image_once(runs):
    """Under DDP each rank scores part of the images (Lightning's sampler repeats one to even out 8 images over
    2 ranks only if needed); the merged result must be the single-process one: the same detections, each image
    once, and the same metric table."""
    assert "Starting with 2 processes" in (runs / "evaluate_ddp" / "stdout.txt").read_text()
    one, two = (json.loads((runs / run / "coco_results.json").read_text()) for run in ("evaluate", "evaluate_ddp"))
    assert_same_results(one, two)
    tables = [re.findall(r"^mAP\s.*$", (runs / run / "stdout.txt").read_text(), re.MULTILINE)
              for run in ("evaluate", "evaluate_ddp")]
    assert tables[0] and tables[0] == tables[1]


def test_predict_matches_evaluate_and_stays_in_original_pixels(runs):
    detections = json.loads((runs / "predict" / "detections.json").read_text())
    from_evaluate = voc_result_scores(runs / "evaluate" / "voc")
    assert len(detections) == 2
    for path, det in detections.items():
        stem = Path(path).stem
        width, height = Image.open(path).size
        assert (runs / "predict" / f"{stem}.png").is_file()
        assert all(0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height for x1, y1, x2, y2 in det["boxes"])
        for name in CLASSES:
            predicted = sorted(s for s, label in zip(det["scores"], det["labels"]) if label == name)
            evaluated = sorted(from_evaluate.get((stem, name), []))
            assert len(predicted) == len(evaluated) and np.allclose(predicted, evaluated, atol=2e-6), (stem, name)


def tie_proof_order(scores: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Detections by descending score, as written to the file (6 decimals), ties broken by the whole box: two
    boxes clipped to the same left edge tie on x1 alone."""
    return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -np.round(scores, 6)))


def test_exported_onnx_gives_predicts_detections(runs):
    """The ONNX file of the trained checkpoint, run by ONNX Runtime on the pipeline's input and mapped back to the
    original pixels, reproduces predict's detections (the same boxes, scores and classes)."""
    import onnxruntime

    from lightning_det.tools.inference import image_batch, load_detector

    detections = json.loads((runs / "predict" / "detections.json").read_text())
    paths = [Path(p) for p in detections]
    _, pipeline = load_detector(next((runs / "run" / "checkpoints").glob("best-*.ckpt")))
    batch = image_batch(paths, pipeline)
    session = onnxruntime.InferenceSession(str(runs / "model.onnx"), providers=["CPUExecutionProvider"])
    boxes, scores, labels, counts = session.run(None, {"images": batch["images"].numpy()})
    for i, path in enumerate(paths):
        expected = detections[str(path)]
        n = int(counts[i])
        # the same decoding rule; only a candidate on a threshold's edge could fall differently in the two runtimes
        assert abs(n - len(expected["scores"])) <= max(1, n // 100) and n > 0
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all()
        scale, pad = batch["meta"]["scale"][i].numpy(), batch["meta"]["pad"][i].numpy()
        height, width = batch["meta"]["orig_size"][i].tolist()
        original = ((boxes[i, :n] - np.tile(pad, 2)) / np.tile(scale, 2)).clip(0, [width, height, width, height])
        top = 20  # the best detections, in a tie-proof order: score (to the file's 6 decimals), then x1, y1, x2, y2
        ours = tie_proof_order(scores[i, :n], original)[:top]
        theirs = tie_proof_order(np.array(expected["scores"]), np.array(expected["boxes"]))[:top]
        assert np.allclose(scores[i, ours], np.array(expected["scores"])[theirs], atol=1e-5)
        assert np.allclose(original[ours], np.array(expected["boxes"])[theirs], atol=1e-2)
        assert [CLASSES[c] for c in labels[i, ours]] == [expected["labels"][j] for j in theirs]
