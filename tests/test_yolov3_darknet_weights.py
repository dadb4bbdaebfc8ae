"""Darknet .weights: layer order against the cfg transcription, round trips, cutoffs and bad files."""

import numpy as np
import pytest
import torch
from darknet_sections import yolov3_cfg, yolov3_tiny_3l_cfg, yolov3_tiny_cfg

from lightning_det.models.yolov3.darknet_weights import darknet_layers, load_darknet_weights, save_darknet_weights
from lightning_det.models.yolov3.network import build_network


@pytest.mark.parametrize(
    "variant, sections", [("yolov3", yolov3_cfg()), ("tiny", yolov3_tiny_cfg()), ("tiny3", yolov3_tiny_3l_cfg())]
)
def test_layer_order_is_the_cfg_order(variant, sections):
    num_classes = 80
    expected = [
        (3 * (5 + num_classes) if s[1] == "P" else s[1], s[2], s[4]) for s in sections if s[0] == "conv"
    ]
    layers = darknet_layers(build_network(variant, num_classes))
    assert [(conv.out_channels, conv.kernel_size[0], norm is not None) for conv, norm in layers] == expected


def randomised(variant: str, seed: int):
    torch.manual_seed(seed)
    network = build_network(variant, num_classes=3, width=0.125)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    return network.eval()


@pytest.mark.parametrize("variant", ["yolov3", "tiny", "tiny3"])
def test_write_then_read_gives_identical_outputs(tmp_path, variant):
    source, target = randomised(variant, 0), randomised(variant, 1)
    save_darknet_weights(source, tmp_path / "net.weights", seen=123456)
    header = load_darknet_weights(target, tmp_path / "net.weights")
    assert header == {"major": 0, "minor": 2, "revision": 0, "seen": 123456}
    images = torch.rand(1, 3, 64, 64)
    for a, b in zip(source(images), target(images)):
        assert torch.equal(a, b)


def test_backbone_cutoff_like_darknet53_conv_74(tmp_path):
    source, target = randomised("yolov3", 0), randomised("yolov3", 1)
    backbone_convs = len(darknet_layers(source.backbone))
    assert backbone_convs == 52
    save_darknet_weights(source, tmp_path / "darknet53.conv.74", cutoff=backbone_convs)
    load_darknet_weights(target, tmp_path / "darknet53.conv.74", cutoff=backbone_convs)
    assert all(torch.equal(a, b) for a, b in zip(source.backbone.state_dict().values(),
                                                  target.backbone.state_dict().values()))
    assert not torch.equal(source.outputs[0][1].conv.weight, target.outputs[0][1].conv.weight)


def test_truncated_and_oversized_files_are_refused(tmp_path):
    network = randomised("tiny", 0)
    save_darknet_weights(network, tmp_path / "net.weights")
    data = (tmp_path / "net.weights").read_bytes()
    (tmp_path / "short.weights").write_bytes(data[:-4])
    (tmp_path / "long.weights").write_bytes(data + np.zeros(8, np.float32).tobytes())
    for name in ("short.weights", "long.weights"):
        with pytest.raises(ValueError, match=name):
            load_darknet_weights(network, tmp_path / name)
    with pytest.raises(ValueError, match="wrong class count|class count"):
        load_darknet_weights(build_network("tiny", num_classes=4, width=0.125), tmp_path / "net.weights")
