"""The GPU check (``bench/gpu_check.py``) runs end to end as its smoke test and counts FLOPs as the published figures
do; the GPU defaults resolve as intended: pinned memory and loader workers for CUDA only, ``trainer=gpu``'s config,
channels-last weights that keep their layout when Lightning moves the model to the GPU."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import bench_script
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from torchvision.models.detection import SSD300_VGG16_Weights

from lightning_det.callbacks import ChannelsLast
from lightning_det.data import DetectionDataModule, LoaderOptions, VOCSource
from lightning_det.data.adapt import loader_workers, usable_cores
from lightning_det.tools.train import build_model

REPO = Path(__file__).resolve().parents[1]
gpu_check = bench_script("gpu_check")

MODELS = {"yolov3", "yolov3_tiny", "ssd300", "faster_rcnn_r50_fpn"}


def table_rows(output: str) -> list[dict[str, str]]:
    """The rows of the Markdown table the check prints, as {column: cell}."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_smoke_check_prints_a_table_of_sane_rows():
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"torch \S+, (CUDA \S+|no CUDA)", done.stdout)
    rows = table_rows(done.stdout)
    throughput = {row["model / command"].split()[0]: row for row in rows if row["check"] == "throughput"}
    assert set(throughput) == MODELS
    for row in throughput.values():
        assert int(row["batch"]) >= 1 and float(row["images/s"]) > 0 and float(row["TFLOP/s"]) >= 0
        assert 0 < float(row["fwd GFLOP/img"]) < float(row["train GFLOP/img"])  # a backward costs more than nothing
    commands = {row["check"]: row for row in rows if row["check"].startswith("sample")}
    assert set(commands) == {"sample train", "sample evaluate", "sample export"}
    assert not any("FAILED" in row["result"] for row in rows)
    assert 0 <= float(re.search(r"val/mAP (\S+),", commands["sample train"]["result"]).group(1)) <= 1
    assert 0 <= float(re.search(r"mAP (\S+) VOC area", commands["sample evaluate"]["result"]).group(1)) <= 1
    assert float(re.search(r"\.onnx (\S+) MiB", commands["sample export"]["result"]).group(1)) > 0
    assert commands["sample train"]["model / command"].startswith("train.py trainer=gpu")


@pytest.mark.parametrize(("model", "classes", "side", "published"), [
    ("yolov3", 80, 416, 65.879),  # Darknet prints "65.879 BFLOPs" for yolov3.cfg at 416 (2 FLOPs a multiply-add)
    ("yolov3_tiny", 80, 416, 5.571),  # and "5.571 BFLOPs" for yolov3-tiny.cfg
    ("ssd300", 90, 300, 2 * SSD300_VGG16_Weights.COCO_V1.meta["_ops"]),  # torchvision counts a multiply-add once
])
def test_forward_flops_equal_the_published_figures(model, classes, side, published):
    cfg = gpu_check.compose_config([f"model={model}"])
    detector = build_model(cfg, num_classes=classes, class_names=[str(i) for i in range(classes)]).to("meta")
    flops = gpu_check.forward_flops(detector, torch.zeros(1, 3, side, side, device="meta"))
    assert flops / 1e9 == pytest.approx(published, rel=2e-3)  # 20 classes instead of 80 would be 0.7 % off


def test_batch_search_keeps_the_largest_batch_before_the_card_runs_out_of_memory(monkeypatch, tmp_path):
    def out_of_memory_above_4(model, cfg, batch, warmup, steps):
        if batch["images"].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 10.0

    monkeypatch.setattr(gpu_check, "images_per_second", out_of_memory_above_4)
    plan = dataclasses.replace(gpu_check.SMOKE, first_batch=1, max_batch=64)
    case = gpu_check.Case("yolov3_tiny", (64, 64), ("model.width=0.25",))
    row = dict(zip(gpu_check.HEADER, gpu_check.throughput_row(
        case, plan, ["trainer=cpu", f"trainer.default_root_dir={tmp_path}"], torch.device("cpu"), peak=1e-3)))
    assert row["batch"] == "4" and row["result"] == "largest batch; 8 out of memory" and row["images/s"] == "10.0"
    share = 100 * float(row["train GFLOP/img"]) * 10.0 / 1e3 / 1e-3  # % of a 1 GFLOP/s card at 10 images/s
    assert float(row["of bf16 peak"].rstrip(" %")) == pytest.approx(share, rel=0.2)  # GFLOP/img has 2 decimals


def test_peak_table_takes_the_specific_name_first():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu_check.peak_tflops("NVIDIA H200") == 989
    assert gpu_check.peak_tflops("NVIDIA L40S") == 362 and gpu_check.peak_tflops("NVIDIA L4") == 121
    assert gpu_check.peak_tflops("Tesla V100-SXM2-16GB") is None


def loader(root: Path, trainer: SimpleNamespace | None, **settings):
    data = DetectionDataModule(root, VOCSource(["train"]), VOCSource(["train"]), loader=LoaderOptions(**settings))
    data.trainer = trainer
    return data._loader(list(range(4)))


def test_pinned_memory_and_auto_workers_follow_the_trainers_accelerator(tmp_path):
    cuda = SimpleNamespace(accelerator=CUDAAccelerator(), num_devices=1)
    cpu = SimpleNamespace(accelerator=CPUAccelerator(), num_devices=1)
    assert loader(tmp_path, cuda).pin_memory
    assert not loader(tmp_path, cpu).pin_memory and not loader(tmp_path, None).pin_memory
    assert not loader(tmp_path, cuda, pin_memory=False).pin_memory and loader(tmp_path, cpu, pin_memory=True).pin_memory
    with pytest.raises(ValueError, match="data.loader.pin_memory must be true, false or auto, got 'yes'"):
        loader(tmp_path, cpu, pin_memory="yes")
    cores, threads = usable_cores(), torch.get_num_threads()
    assert loader(tmp_path, cuda, num_workers="auto").num_workers == loader_workers(False, cores, threads) >= 1
    assert loader(tmp_path, cpu, num_workers="auto").num_workers == loader_workers(True, cores, threads)


@pytest.mark.parametrize("data", sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml")))
def test_trainer_gpu_sets_the_gpu_defaults_and_a_cpu_run_keeps_its_own(cfg_train, data):
    plain, gpu = cfg_train(f"data={data}"), cfg_train(f"data={data}", "trainer=gpu")
    # workers by the machine (data/adapt.py)
    assert plain.data.loader.num_workers == gpu.data.loader.num_workers == "auto"
    assert plain.data.loader.pin_memory == gpu.data.loader.pin_memory == "auto" and plain.trainer.precision == "auto"
    assert gpu.trainer.precision == "bf16-mixed" and gpu.trainer.benchmark and gpu.trainer.accelerator == "gpu"
    assert gpu.trainer._target_ == plain.trainer._target_ and gpu.trainer.plugins == plain.trainer.plugins
    assert set(gpu) == set(plain)  # the global package adds no top-level keys


def test_the_command_line_wins_over_trainer_gpu_and_evaluate_gets_it_too(cfg_train, cfg_eval):
    assert cfg_train("trainer=gpu", "data.loader.num_workers=3").data.loader.num_workers == 3
    assert cfg_train("trainer=gpu", "trainer.precision=16-mixed").trainer.precision == "16-mixed"
    evaluate = cfg_eval("trainer=gpu")
    assert evaluate.data.loader.num_workers == "auto" and evaluate.trainer.precision == "bf16-mixed"


def test_channels_last_weights_keep_their_layout_when_moved_to_the_device():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    ChannelsLast().setup(None, model, "fit")  # Lightning calls setup before the strategy moves the model
    moved = model.to("meta")  # stands in for the GPU: Module.to(device) keeps each tensor's strides
    assert moved[0].weight.is_contiguous(memory_format=torch.channels_last)
