"""docs/adding.md's worked example, run as a reader would: its code blocks saved as the files it names, a CSV
dataset of painted boxes read by its source, its detector trained through ``train.py`` and scored."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from runs import REPO

PAGE = REPO / "docs" / "adding.md"
# The files the page names for its blocks, in the order it shows them.
FILES = ["my_project/grid_detector.py", "my_conf/model/grid.yaml", "my_project/csv_source.py", "my_conf/data/csv.yaml"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}


def blocks() -> list[str]:
    return re.findall(r"```(?:python|yaml)\n(.*?)```", PAGE.read_text(), flags=re.S)


def write_example(folder: Path) -> None:
    text = PAGE.read_text()
    assert all(f"`{name}`" in text for name in FILES), "the page names each file it shows"
    for name, block in zip(FILES, blocks(), strict=True):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(block)
    (folder / "my_project" / "__init__.py").write_text("")


def write_painted_boxes(root: Path, split: str, count: int, seed: int) -> list[list[str]]:
    """``count`` grey 128 px images with one to three filled rectangles of two colours, and their CSV lines."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (128, 128), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        name = f"images/{split}{index:03d}.png"
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            width, height = (int(v) for v in torch.randint(20, 48, (2,), generator=generator))
            x1, y1 = (int(v) for v in torch.randint(0, 128 - 48, (2,), generator=generator))
            colour = list(COLOURS)[int(torch.randint(2, (), generator=generator))]
            draw.rectangle([x1, y1, x1 + width - 1, y1 + height - 1], fill=COLOURS[colour])
            rows.append([name, str(x1), str(y1), str(x1 + width), str(y1 + height), colour])
        image.save(root / name)
    with open(root / f"{split}.csv", "w", newline="") as file:
        csv.writer(file).writerows(rows)
    return rows


def test_the_csv_source_reads_the_boxes_it_was_given(tmp_path):
    write_example(tmp_path)
    rows = write_painted_boxes(tmp_path / "data", "train", 6, seed=0)
    sys.path.insert(0, str(tmp_path))
    try:
        from my_project.csv_source import CSVSource

        from lightning_det.data.records import read_annotations
        annotations = read_annotations(tmp_path / "data", [CSVSource(["train.csv"])])
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m.startswith("my_project")]:
            del sys.modules[module]
    table = annotations.records[0]
    assert annotations.classes == ["blue", "red"]
    read = sorted((os.path.basename(record.path), *record.boxes[k].tolist(), annotations.classes[record.labels[k]])
                  for record in table for k in range(len(record.boxes)))
    given = sorted((os.path.basename(r[0]), *map(float, r[1:5]), r[5]) for r in rows)
    assert read == given


@pytest.mark.slow
def test_the_grid_detector_of_the_page_trains_and_scores(tmp_path):
    write_example(tmp_path)
    write_painted_boxes(tmp_path / "data", "train", 48, seed=0)
    write_painted_boxes(tmp_path / "data", "val", 16, seed=1)
    run = tmp_path / "run"
    overrides = [
        f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "model=grid", "data=csv", f"data.root={tmp_path / 'data'}",
        "data.img_size=128", "data.loader.num_workers=0", "trainer.max_epochs=12",
        "callbacks.progress_bar.refresh_rate=0",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    final = json.loads((run / "final_metrics.json").read_text())
    # painted rectangles on grey: a detector that learns nothing scores ~0; this one finds most of them
    assert final["val/mAP"] > 0.3, final
