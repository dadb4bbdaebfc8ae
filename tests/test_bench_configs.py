"""The bench scripts measure the models ``train.py`` trains: their configs are composed with the defaults lists
(``yolov3_tiny`` starts from ``yolov3``), which a bare ``OmegaConf.load`` of the model file would miss."""

from __future__ import annotations

import pytest
from helpers import BENCH, bench_script
from hydra.utils import instantiate

from lightning_det.models.ssd import SSD
from lightning_det.models.yolov3 import YOLOv3
from lightning_det.models.yolov3.network import YOLOv3TinyNetwork


@pytest.mark.parametrize("name", sorted(path.stem for path in (BENCH.parent / "conf" / "model").glob("*.yaml")))
def test_every_model_config_composes_with_its_target(name: str) -> None:
    model = bench_script("configs").model_config(name).model
    assert model._target_.startswith("lightning_det.models."), name


def test_a_model_that_starts_from_another_is_built_whole() -> None:
    """yolov3_tiny's file holds only what differs from yolov3: the composed config builds the tiny network."""
    configs = bench_script("configs")
    tiny = instantiate(configs.model_config("yolov3_tiny").model, num_classes=3, width=0.25, _recursive_=False)
    assert isinstance(tiny, YOLOv3) and isinstance(tiny.network, YOLOv3TinyNetwork)
    ssd512 = configs.model_config("ssd512")
    assert ssd512.data.img_size == 512
    assert instantiate(ssd512.model, num_classes=3, _recursive_=False).__class__ is SSD


def test_train_step_bench_builds_the_tiny_model() -> None:
    model, img_size = bench_script("train_step").from_config("yolov3_tiny", 416)()
    assert isinstance(model.network, YOLOv3TinyNetwork) and img_size == 416
