"""Inference latency of a detector with its decoding and NMS: eager PyTorch against its TorchScript trace and its
ONNX file in ONNX Runtime (what ``python -m lightning_det.tools.export`` writes), batch 1, on this CPU.

    python bench/export.py
    python bench/export.py --models yolov3_tiny --iterations 50 --threads 1

The models are the configs' own (random weights, 20 classes) with a score threshold of ``--conf`` so that decoding
and NMS see a realistic number of candidates.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch
from configs import model_config
from hydra.utils import instantiate
from tables import table

from lightning_det.tools.export import ExportableDetector, export_onnx, export_torchscript

MODELS = ["yolov3_tiny", "yolov3", "ssdlite", "ssd300", "faster_rcnn_mobilenet"]
DARKNET_SIZE = 416  # the YOLO configs choose their input from the data (img_size: auto); measured at Darknet's

log = logging.getLogger(__name__)


def build(name: str, conf: float) -> tuple[ExportableDetector, int]:
    cfg = model_config(name)
    cfg.model.decoder.score_thresh = conf
    detector = instantiate(cfg.model, num_classes=20, _recursive_=False).eval()  # parts go in as configs
    if "max_size" in cfg.data.pipeline.train_transform:  # Faster R-CNN: the canvas export gives it by default
        side = int(cfg.data.pipeline.train_transform.max_size)
    else:
        side = DARKNET_SIZE if cfg.data.img_size == "auto" else int(cfg.data.img_size)
    batch = 1 if detector.export_batch_fixed else None
    return ExportableDetector(detector, (side, side), batch).eval(), side


def milliseconds(run: Callable[[], object], warmup: int, iterations: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS,
                        default=["yolov3_tiny", "ssdlite", "faster_rcnn_mobilenet"])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--conf", type=float, default=0.25, help="score threshold of the decoding")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20, help="timed runs (the median is reported)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads

    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for name in args.models:
            module, side = build(name, args.conf)
            image = torch.rand(1, 3, side, side)
            onnx_path, script_path = Path(folder) / f"{name}.onnx", Path(folder) / f"{name}.torchscript"
            export_onnx(module, image, onnx_path, opset=17, dynamic_batch=False, props={})
            export_torchscript(module, image, script_path, props={})
            session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            traced = torch.jit.load(str(script_path))
            runs = {
                "pytorch eager": lambda: module(image),
                "torchscript": lambda: traced(image),
                "onnxruntime": lambda: session.run(None, {"images": image.numpy()}),
            }
            for runtime, run in runs.items():
                rows.append((name, str(side), runtime, f"{milliseconds(run, args.warmup, args.iterations):.1f}"))

    header = ("model", "input", "runtime", "ms/image")
    title = f"inference with decoding + NMS, batch 1, {args.threads} threads, median of {args.iterations}"
    log.info(table(title, header, rows))


if __name__ == "__main__":
    main()
