"""Exported detectors (ONNX run by onnxruntime, TorchScript by torch.jit.load) against the PyTorch detector's own
``decode`` on real image batches, the padded output layout, the metadata, and the command line."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch import nn

from lightning_det.models.backbones.pretrained import IMAGENET_MEAN, IMAGENET_STD
from lightning_det.models.postprocess import suppress_and_pad, suppress_and_split
from lightning_det.models.ssd import SSD
from lightning_det.models.yolov3 import YOLOv3
from lightning_det.tools.export import export, export_pipeline
from lightning_det.tools.inference import image_batch, load_detector

REPO = Path(__file__).resolve().parents[1]
SIZE = 96
CLASSES = ["circle", "square", "triangle"]
PIPELINES = {
    "yolov3_tiny": {"_target_": "lightning_det.data.transforms.LetterboxTransform", "img_size": SIZE, "fill": 114},
    "ssdlite": {"_target_": "lightning_det.data.transforms.SSDEvalTransform", "img_size": SIZE},
}
MAX_DETECTIONS = {"yolov3_tiny": 40, "ssdlite": 100}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Case(NamedTuple):
    checkpoint: Path
    max_detections: int


def detector(name: str) -> nn.Module:
    """A tiny untrained detector whose convolutions are re-drawn at full scale: its scores then depend on the image
    and spread out (an initialised head gives near-equal scores, whose order is down to rounding)."""
    torch.manual_seed(0)
    k = MAX_DETECTIONS[name]
    if name == "yolov3_tiny":
        model = YOLOv3(variant="tiny", width=0.25, num_classes=3, class_names=CLASSES,
                       decoder={"score_thresh": 0.5, "max_detections": k})
    else:
        model = SSD(variant="ssdlite", width=0.25, num_classes=3, class_names=CLASSES, pixel_mean=IMAGENET_MEAN,
                    pixel_std=IMAGENET_STD, decoder={"score_thresh": 0.9, "max_detections": k})
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.5)
    return model.eval()


def write_checkpoint(model: nn.Module, pipeline: dict, path: Path) -> Path:
    """The parts of a train.py checkpoint that ``load_detector`` reads, written through the detector's own hook."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.inference_pipeline = pipeline
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        name: Case(write_checkpoint(detector(name), pipeline, folder / f"{name}.ckpt"), MAX_DETECTIONS[name])
        for name, pipeline in PIPELINES.items()
    }


@pytest.fixture(params=sorted(PIPELINES))
def case(request, cases) -> Case:
    return cases[request.param]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Grey noise of three strengths: busy images get many detections, the calm one few or none."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, amplitude in enumerate([127, 30, 70]):
        noise = np.random.default_rng(seed).uniform(-1, 1, size=(SIZE, SIZE, 3))
        paths.append(folder / f"{seed}.png")
        Image.fromarray((128 + amplitude * noise).round().astype(np.uint8)).save(paths[-1])
    return paths


def reference(ckpt: Path, paths: list[Path]) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """The pipeline's input batch and the PyTorch detector's detections of it, in batch pixels."""
    model, pipeline = load_detector(ckpt)
    images = image_batch(paths, pipeline)["images"]
    with torch.no_grad():
        detections = model.decode(model(model.normalise(images)), {"images": images})
    return images.numpy(), [{k: v.numpy() for k, v in d.items()} for d in detections]


def assert_same_detections(outputs: list[np.ndarray], expected: list[dict[str, np.ndarray]]) -> None:
    """Padded exported outputs hold, per image, the reference detections (best first) and then padding."""
    boxes, scores, labels, counts = outputs
    assert boxes.dtype == scores.dtype == np.float32 and labels.dtype == counts.dtype == np.int64
    assert counts.tolist() == [len(d["scores"]) for d in expected]
    for b, det in enumerate(expected):
        n = counts[b]
        assert (np.diff(scores[b, :n]) <= 0).all()  # best first
        order = np.argsort(-scores[b, :n], kind="stable")
        reference_order = np.argsort(-det["scores"], kind="stable")
        assert np.allclose(scores[b, :n][order], det["scores"][reference_order], atol=1e-5)
        # Sub-pixel: onnxruntime's convolutions round differently, and box decoding exponentiates raw outputs.
        assert np.allclose(boxes[b, :n][order], det["boxes"][reference_order], atol=1e-3)
        assert labels[b, :n][order].tolist() == det["labels"][reference_order].tolist()
        assert (boxes[b, n:] == 0).all() and (scores[b, n:] == 0).all() and (labels[b, n:] == -1).all()


def operators(graph: onnx.GraphProto) -> set[str]:
    """Every node type of a graph and of its subgraphs (the branches of ``If`` nodes)."""
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found |= operators(attribute.g)
    return found


def test_onnx_matches_pytorch_on_a_batch_with_different_detection_counts(case, images, tmp_path):
    path = export(case.checkpoint, "onnx", output=tmp_path / "model.onnx", batch_size=2, opset=11)
    batch, expected = reference(case.checkpoint, images)
    assert len(expected[0]["scores"]) > len(expected[1]["scores"])  # so the images' padding differs
    session = onnxruntime.InferenceSession(str(path))
    outputs = session.run(None, {"images": batch[:2]})
    assert outputs[1].shape == (2, case.max_detections)
    assert_same_detections(outputs, expected[:2])
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # the batch size is fixed without dynamic_batch
        session.run(None, {"images": batch})

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    detector = load_detector(case.checkpoint)[0]
    assert torch.equal(torch.tensor(json.loads(props["mean"])), detector.pixel_mean.flatten())  # as float32
    assert torch.equal(torch.tensor(json.loads(props["std"])), detector.pixel_std.flatten())
    assert int(props["img_size"]) == SIZE and json.loads(props["class_names"]) == CLASSES
    assert model.opset_import[0].version == 11  # the oldest that torchvision exports NMS to
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels", "num_detections"]
    assert "NonMaxSuppression" in operators(model.graph)


def test_dynamic_batch_onnx_runs_another_batch_size(case, images, tmp_path):
    path = export(case.checkpoint, "onnx", output=tmp_path / "model.onnx", batch_size=1, dynamic_batch=True)
    batch, expected = reference(case.checkpoint, images)
    assert_same_detections(onnxruntime.InferenceSession(str(path)).run(None, {"images": batch}), expected)


def test_img_size_overrides_the_checkpoint_pipeline(cases, images, tmp_path):
    case = cases["yolov3_tiny"]
    path = export(case.checkpoint, "onnx", output=tmp_path / "model.onnx", img_size=2 * SIZE, dynamic_batch=True)
    model, _ = load_detector(case.checkpoint)
    pipeline = instantiate(export_pipeline(model, 2 * SIZE))
    batch = image_batch(images, pipeline)["images"]
    assert batch.shape[-2:] == (2 * SIZE, 2 * SIZE)
    with torch.no_grad():
        detections = model.decode(model(model.normalise(batch)), {"images": batch})
    expected = [{k: v.numpy() for k, v in d.items()} for d in detections]
    assert any(len(d["scores"]) for d in expected)
    session = onnxruntime.InferenceSession(str(path))
    assert session.get_inputs()[0].shape == ["batch", 3, 2 * SIZE, 2 * SIZE]
    assert json.loads(session.get_modelmeta().custom_metadata_map["pipeline"])["img_size"] == 2 * SIZE
    assert_same_detections(session.run(None, {"images": batch.numpy()}), expected)


def test_a_rect_evaluation_pipeline_exports_a_square_input(images, tmp_path):
    """A checkpoint validated on rectangles (``data.pipeline.rect_eval=true``) exports the square letterbox its graph
    takes, and the metadata's pipeline makes that input from a non-square image."""
    pipeline = {**PIPELINES["yolov3_tiny"], "rect": True, "stride": 32}
    checkpoint = write_checkpoint(detector("yolov3_tiny"), pipeline, tmp_path / "rect.ckpt")
    wide = tmp_path / "wide.png"
    Image.open(images[0]).resize((SIZE, SIZE // 2)).save(wide)
    assert image_batch([wide], instantiate(pipeline))["images"].shape[-2:] == (64, SIZE)  # 48 up to stride 32
    path = export(checkpoint, "onnx", output=tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path))
    exported = json.loads(session.get_modelmeta().custom_metadata_map["pipeline"])
    batch = image_batch([wide], instantiate(exported))["images"]
    assert exported["rect"] is False and batch.shape[-2:] == (SIZE, SIZE)
    model, _ = load_detector(checkpoint)
    with torch.no_grad():
        detections = model.decode(model(model.normalise(batch)), {"images": batch})
    expected = [{k: v.numpy() for k, v in d.items()} for d in detections]
    assert_same_detections(session.run(None, {"images": batch.numpy()}), expected)


def test_torchscript_matches_pytorch_at_another_batch_size(case, images, tmp_path):
    path = export(case.checkpoint, "torchscript", output=tmp_path / "model.torchscript", batch_size=1)
    batch, expected = reference(case.checkpoint, images)
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    with torch.no_grad():
        outputs = [t.numpy() for t in scripted(torch.from_numpy(batch))]
    assert_same_detections(outputs, expected)
    assert json.loads(extra["metadata.json"])["class_names"] == json.dumps(CLASSES)


def test_padded_layout_holds_the_split_detections_by_hand():
    """Image 0: two overlapping boxes of class 1 (NMS keeps the better) and one of class 0, capped at K = 2;
    image 1: nothing; image 2: one box."""
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [5, 5, 9, 9], [0, 0, 4, 4.0]])
    scores = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.5])
    labels = torch.tensor([1, 1, 0, 0, 2])
    image = torch.tensor([0, 0, 0, 0, 2])
    args = (boxes, scores, labels, image, 3, 3, 0.5, 2)
    padded = suppress_and_pad(*args)
    split = suppress_and_split(*args)
    assert padded.num_detections.tolist() == [len(d["scores"]) for d in split] == [2, 0, 1]
    assert torch.equal(padded.scores, torch.tensor([[0.9, 0.6], [0.0, 0.0], [0.5, 0.0]]))
    assert padded.labels.tolist() == [[1, 0], [-1, -1], [2, -1]]
    assert padded.boxes.tolist() == [[[0, 0, 10, 10], [5, 5, 9, 9]], [[0] * 4] * 2, [[0, 0, 4, 4], [0] * 4]]
    for rows, det in enumerate(split):
        n = len(det["scores"])
        assert torch.equal(padded.scores[rows, :n], det["scores"]) and torch.equal(padded.boxes[rows, :n], det["boxes"])


def test_command_line_writes_next_to_the_checkpoint_and_prints_the_input_contract(cases, tmp_path):
    case = cases["yolov3_tiny"]
    done = subprocess.run(
        [sys.executable, "-m", "lightning_det.tools.export", f"ckpt_path={case.checkpoint}", "dynamic_batch=true",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = case.checkpoint.with_suffix(".onnx")  # the default format, beside the checkpoint
    text = done.stdout + done.stderr
    assert written.is_file() and str(written) in text
    printed = json.loads(re.search(r"mean (\[[^]]*\])", text).group(1))
    assert torch.equal(torch.tensor(printed), load_detector(case.checkpoint)[0].pixel_mean.flatten())
    assert f"[any, 3, {SIZE}, {SIZE}]" in text
    assert f"labels [B, {case.max_detections}] int64" in text
    assert onnxruntime.InferenceSession(str(written)).get_inputs()[0].shape == ["batch", 3, SIZE, SIZE]


def test_unknown_format_is_refused(cases):
    case = cases["yolov3_tiny"]
    with pytest.raises(ValueError, match="format"):
        export(case.checkpoint, "tflite")
    assert not list(case.checkpoint.parent.glob("*.tflite"))


def test_onnx_export_works_after_the_default_install():
    """The README's export command right after its first command: what ONNX export imports is a dependency of
    the package, not an extra (a newcomer met a 20-line ImportError)."""
    installed = importlib.metadata.requires("lightning_det")  # what pip installed, from pyproject.toml
    unconditional = {re.split(r"[<>=~!; \[]", requirement)[0] for requirement in installed
                     if "extra ==" not in requirement}
    assert {"onnx", "onnxruntime"} <= unconditional
    assert not any('extra == "export"' in requirement for requirement in installed)
