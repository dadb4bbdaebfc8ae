"""Anchor k-means: recovers well-separated shape clusters; fitness by hand; the command runs on sample data."""

import subprocess
import sys
from pathlib import Path

import torch

from lightning_det.models.yolov3.anchor_clustering import anchor_fitness, kmeans_anchors, letterboxed_sizes


def test_three_shape_clusters_are_recovered():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 20.0], [60.0, 40.0], [200.0, 300.0]])
    wh = torch.cat([c * (1 + 0.05 * torch.randn(50, 2, generator=generator)) for c in centres])
    anchors = kmeans_anchors(wh, 3)
    assert torch.allclose(anchors, centres, rtol=0.05)
    assert anchor_fitness(wh, anchors, iou_t=0.5)["best_possible_recall"] == 1.0


def test_fitness_by_hand():
    wh = torch.tensor([[10.0, 10.0], [20.0, 10.0]])
    anchors = torch.tensor([[10.0, 10.0]])
    # IoUs: 1.0 and 100 / 200 = 0.5
    fit = anchor_fitness(wh, anchors, iou_t=0.6)
    assert abs(fit["mean_iou"] - 0.75) < 1e-6 and fit["best_possible_recall"] == 0.5


def test_letterbox_scaling_uses_the_long_side():
    boxes = [torch.tensor([[0.0, 0.0, 100.0, 50.0]]), torch.tensor([[10.0, 10.0, 30.0, 50.0]])]
    wh = letterboxed_sizes(boxes, [(200, 400), (416, 208)], img_size=416)
    assert torch.allclose(wh, torch.tensor([[104.0, 52.0], [20.0, 40.0]]))


def test_command_prints_anchors_for_the_sample_data(tmp_path):
    args = [sys.executable, "-m", "lightning_det.anchors", f"data.root={tmp_path / 'sample'}",
            "data.prepare.num_train=16", "data.prepare.num_val=4", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(args, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best possible recall" in done.stdout and done.stdout.count("    - [") == 2  # two levels for tiny
