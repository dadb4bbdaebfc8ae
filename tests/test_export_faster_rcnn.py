"""Faster R-CNN exported whole (backbone, RPN, RoI head, decoding and NMS in one graph) from a checkpoint that
train.py writes here, against the PyTorch detector: ONNX Runtime and TorchScript, the square canvas input, and
the fixed batch size."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hydra.utils import instantiate
from test_export import operators

from lightning_det.tools.export import export, export_pipeline
from lightning_det.tools.inference import image_batch, load_detector

REPO = Path(__file__).resolve().parents[1]
BATCH = 3
MAX_SIZE = 224

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Ten epochs of faster_rcnn_mobilenet on 32 sample images at 160-224 px (about a minute): enough for
    detections that differ from image to image. The score threshold is low so that each image has many, and
    different counts."""
    tmp = tmp_path_factory.mktemp("frcnn")
    done = subprocess.run(
        [sys.executable, "train.py", "model=faster_rcnn_mobilenet", "data.pipeline.train_transform.min_size=160",
         f"data.pipeline.train_transform.max_size={MAX_SIZE}", "data.batch_size=4", "data.loader.num_workers=0",
         "data.sampler.min_steps_per_epoch=0", "data.loader.persistent_workers=false", "trainer.max_epochs=10",
         "model.decoder.score_thresh=0.01", "callbacks.progress_bar.refresh_rate=0", f"data.root={tmp / 'sample'}",
         "data.reading.prepare.num_train=32", "data.reading.prepare.num_val=8", f"paths.log_dir={tmp / 'logs'}",
         f"hydra.run.dir={tmp / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    images = sorted((tmp / "sample" / "VOCsample" / "JPEGImages").glob("*.jpg"))[:BATCH]
    return tmp / "run" / "checkpoints" / "last.ckpt", images


def exported_input(checkpoint: Path, paths: list[Path]) -> torch.Tensor:
    """The batch the exported model takes: the checkpoint's pipeline with the canvas ``export`` describes."""
    model, _ = load_detector(checkpoint)
    return image_batch(paths, instantiate(export_pipeline(model, None)))["images"]


def reference(checkpoint: Path, images: torch.Tensor) -> list[dict[str, np.ndarray]]:
    model, _ = load_detector(checkpoint)
    with torch.no_grad():
        detections = model.decode(model(model.normalise(images)), {"images": images})
    return [{k: v.numpy() for k, v in d.items()} for d in detections]


def assert_same_detections(outputs: list[np.ndarray], expected: list[dict[str, np.ndarray]]) -> None:
    """Per image, the padded rows hold the reference detections, best first, then padding. They are matched as
    sets: two detections whose scores agree to 1e-7 may come in either order from two runtimes."""
    boxes, scores, labels, counts = outputs
    assert counts.tolist() == [len(d["scores"]) for d in expected]
    assert len(set(counts.tolist())) > 1  # the images' padding differs
    for b, det in enumerate(expected):
        n = counts[b]
        assert (np.diff(scores[b, :n]) <= 0).all()
        assert np.allclose(scores[b, :n], det["scores"], atol=1e-5)  # the same sorted scores
        unused = np.ones(n, dtype=bool)
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            close = unused & (labels[b, :n] == label) & (np.abs(scores[b, :n] - score) < 1e-5)
            close &= np.abs(boxes[b, :n] - box).max(1) < 1e-2  # sub-pixel: two box decodings, other rounding
            assert close.any(), (b, box, score, label)
            unused[np.flatnonzero(close)[0]] = False
        assert (boxes[b, n:] == 0).all() and (scores[b, n:] == 0).all() and (labels[b, n:] == -1).all()


def test_onnx_runtime_gives_the_pytorch_detections(trained, tmp_path):
    checkpoint, paths = trained
    path = export(checkpoint, "onnx", output=tmp_path / "model.onnx", batch_size=BATCH)
    images = exported_input(checkpoint, paths)
    assert images.shape == (BATCH, 3, MAX_SIZE, MAX_SIZE)
    session = onnxruntime.InferenceSession(str(path))
    assert_same_detections(session.run(None, {"images": images.numpy()}), reference(checkpoint, images))
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # the batch size is the traced one
        session.run(None, {"images": images[:2].numpy()})

    model = onnx.load(str(path))
    assert {"NonMaxSuppression", "RoiAlign"} <= operators(model.graph)
    props = {p.key: p.value for p in model.metadata_props}
    pipeline = json.loads(props["pipeline"])
    detector = load_detector(checkpoint)[0]
    assert pipeline["canvas"] == MAX_SIZE == int(props["img_size"])
    assert pipeline["fill"] == json.loads(props["mean"])
    assert torch.equal(torch.tensor(pipeline["fill"]), detector.pixel_mean.flatten())  # the same float32s


def test_the_canvas_is_the_padded_evaluation_batch_after_normalising(trained):
    """Filled with the model's mean pixel, the canvas normalises to what a padded evaluation batch gives: the
    image, then zeros (``Detector.normalise`` zeroes a batch's padding, as torchvision's transform does)."""
    checkpoint, paths = trained
    model, pipeline = load_detector(checkpoint)
    canvas = exported_input(checkpoint, paths)
    batch = image_batch(paths, pipeline, size_divisor=MAX_SIZE)
    assert batch["images"].shape == canvas.shape
    assert len({tuple(size) for size in batch["meta"]["image_size"].tolist()}) > 1  # padded differently
    expected = model.normalise(batch["images"], batch["meta"]["image_size"])
    assert torch.allclose(model.normalise(canvas), expected, atol=1e-5)


def test_torchscript_gives_the_pytorch_detections_and_refuses_another_batch_size(trained, tmp_path):
    checkpoint, paths = trained
    path = export(checkpoint, "torchscript", output=tmp_path / "model.torchscript", batch_size=BATCH)
    images = exported_input(checkpoint, paths)
    traced = torch.jit.load(str(path))
    with torch.no_grad():
        outputs = [t.numpy() for t in traced(images)]
        assert_same_detections(outputs, reference(checkpoint, images))
        with pytest.raises(RuntimeError, match=r"shape '\[3, 3, 224, 224\]' is invalid"):
            traced(images[:1])  # without the guard: the first image decoded, two images' worth of padding


def test_dynamic_batch_is_refused_with_the_reason_and_the_fix(trained, tmp_path):
    checkpoint, _ = trained
    reason = f"{re.escape(str(checkpoint))} holds a FasterRCNN, whose graph takes one batch size, because its RoI head"
    with pytest.raises(ValueError, match=f"{reason}.*batch_size="):
        export(checkpoint, "onnx", output=tmp_path / "model.onnx", dynamic_batch=True)
    assert not (tmp_path / "model.onnx").exists()
