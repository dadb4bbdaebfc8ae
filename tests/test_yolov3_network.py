"""YOLOv3 networks against an independent walk of Darknet's yolov3.cfg / yolov3-tiny(_3l).cfg layer lists."""

import pytest
import torch
from darknet_sections import yolov3_cfg, yolov3_tiny_3l_cfg, yolov3_tiny_cfg
from torch import nn

from lightning_det.models.backbones.darknet import scaled_channels
from lightning_det.models.yolov3.network import build_network


def walk(sections, num_classes):
    """Trainable parameters and conv count the way Darknet builds the network, tracking channels per layer."""
    channels, params, convs = [], 0, 0
    current = 3
    for i, section in enumerate(sections):
        kind = section[0]
        if kind == "conv":
            _, filters, size, _, bn = section
            filters = 3 * (5 + num_classes) if filters == "P" else filters
            params += filters * current * size * size + (2 * filters if bn else filters)
            convs += 1
            current = filters
        elif kind == "route":
            current = sum(channels[i + j if j < 0 else j] for j in section[1])
        channels.append(current)
    return params, convs


def trainable_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def conv_count(model):
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_cfg_walk_reproduces_the_published_yolov3_figure():
    assert walk(yolov3_cfg(), 80) == (61_949_149, 75)


@pytest.mark.parametrize("num_classes", [80, 20])
@pytest.mark.parametrize(
    ("variant", "cfg", "cfg_convs"), [("yolov3", yolov3_cfg, 75), ("tiny", yolov3_tiny_cfg, 13),
                                      ("tiny3", yolov3_tiny_3l_cfg, 16)]
)
def test_parameters_and_layers_match_the_darknet_cfg(variant, cfg, cfg_convs, num_classes):
    model = build_network(variant, num_classes)
    params, convs = walk(cfg(), num_classes)
    assert trainable_parameters(model) == params
    assert conv_count(model) == convs == cfg_convs


@torch.no_grad()
@pytest.mark.parametrize(("variant", "grids"), [("yolov3", [52, 26, 13]), ("tiny", [26, 13]), ("tiny3", [52, 26, 13])])
def test_output_shapes_at_416(variant, grids):
    model = build_network(variant, num_classes=80).eval()
    outputs = model(torch.zeros(1, 3, 416, 416))
    assert [tuple(o.shape) for o in outputs] == [(1, 3, g, g, 85) for g in grids]
    assert [416 // g for g in grids] == list(model.strides)


def test_width_and_depth_shrink_the_network():
    small = build_network("yolov3", num_classes=2, width=0.25, depth=0.33)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 and c.out_channels >= 8 for c in convs if c.bias is None)
    assert sorted(c.out_channels for c in convs if c.bias is not None) == [3 * 7] * 3
    assert small.backbone.out_channels == (64, 128, 256)
    residual_blocks = [len(stage) - 1 for stage in small.backbone.stages]  # each stage: downsample conv + blocks
    assert residual_blocks == [1, 1, 3, 3, 1]
    outputs = small(torch.zeros(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 8, 12, 7), (2, 3, 4, 6, 7), (2, 3, 2, 3, 7)]


def test_scaled_channels_rounds_up_to_multiples_of_eight():
    assert [scaled_channels(c, w) for c, w in [(32, 1.0), (32, 0.1), (100, 1.0), (64, 0.3)]] == [32, 8, 104, 24]


def test_tiny_rejects_a_depth_multiplier():
    with pytest.raises(ValueError, match="width"):
        build_network("tiny", num_classes=3, depth=0.5)


def test_prediction_bias_starts_at_the_priors():
    model = build_network("tiny", num_classes=20)
    bias = model.output32[-1].conv.bias.view(3, 25)
    # about 8 objects in a 640 px image: per stride-32 cell 8 / 20^2 = 0.02; class 0.6 / 19.01
    assert torch.allclose(bias[:, 4].sigmoid(), torch.full((3,), 0.02 / 1.02), atol=1e-6)
    assert torch.allclose(bias[:, 5:].exp(), torch.full((3, 20), 0.6 / 19.01))


def test_tiny_stride_one_pool_ignores_the_missing_neighbours_like_darknet():
    from lightning_det.models.backbones.darknet import DarknetTiny

    pad_and_pool = DarknetTiny(width=0.125).to_stride32[2:4]
    x = torch.full((1, 1, 3, 3), -5.0)
    x[0, 0, 0, 0] = -7.0
    out = pad_and_pool(x)
    # each output is the max of the up-to-four inputs that exist; a zero pad would put 0 in the last row/column
    assert out.shape == x.shape and torch.equal(out, torch.full_like(x, -5.0))
