"""backbone_weights: torchvision-format ImageNet state dicts (a file or a weights name) land on our backbones.

The files are torchvision's own networks with random weights (and random batch-norm statistics, so the norm
layers matter), written once per module; each backbone is then compared with torchvision's network loading the
same file: the tensors by name and the features on an input.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from lightning_det.models.backbones.pretrained import load_mapped
from lightning_det.models.faster_rcnn import FasterRCNN
from lightning_det.models.faster_rcnn.network import build_network
from lightning_det.models.ssd import SSD
from lightning_det.tools.train import build_model


def randomised_norms(model: nn.Module) -> nn.Module:
    """Batch norm with non-trivial statistics and affine parameters, so loading them (or not) shows."""
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """torchvision-format state dicts of vgg16, resnet50 and mobilenet_v3_large, named as torchvision's downloads."""
    folder = tmp_path_factory.mktemp("imagenet")
    paths = {}
    with torch.no_grad():
        for seed, name in enumerate(("vgg16", "resnet50", "mobilenet_v3_large")):
            torch.manual_seed(seed)
            model = randomised_norms(torchvision.models.get_model(name))
            paths[name] = folder / Path(torchvision.models.get_model_weights(name).DEFAULT.url).name
            torch.save(model.state_dict(), paths[name])
    return paths


@pytest.fixture(scope="module")
def states(files) -> dict[str, dict[str, torch.Tensor]]:
    return {name: torch.load(path, weights_only=True, mmap=True) for name, path in files.items()}


def reference(name: str, state: dict[str, torch.Tensor], **kwargs) -> nn.Module:
    """torchvision's own network holding the state dict, in eval mode."""
    model = torchvision.models.get_model(name, **kwargs)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def vgg(states) -> nn.Module:
    return reference("vgg16", states["vgg16"])


def test_vgg16_file_fills_faster_rcnn_conv_body_and_fc_head(files, states, vgg):
    state = states["vgg16"]
    network = build_network("vgg16", backbone_weights=str(files["vgg16"]))
    body, head = network.backbone.body, network.box_head
    for ours, theirs in ((body[0].weight, "features.0.weight"), (body[12].bias, "features.12.bias"),
                         (body[28].weight, "features.28.weight"), (head[1].weight, "classifier.0.weight"),
                         (head[3].bias, "classifier.3.bias")):
        assert torch.equal(ours, state[theirs]), theirs

    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(network.backbone.eval()(images)["0"], vgg.features[:30](images), atol=1e-5)
        rois = torch.randn(3, 512, 7, 7)
        fc7 = F.relu(vgg.classifier[3](F.relu(vgg.classifier[0](rois.flatten(1)))))
        assert torch.allclose(head(rois), fc7, atol=1e-5)


def test_vgg16_file_fills_ssd_reduced_vgg_and_decimates_fc6_fc7(files, states, vgg):
    state = states["vgg16"]
    backbone = SSD(variant="ssd300", num_classes=2, backbone_weights=str(files["vgg16"])).network.backbone.eval()
    assert torch.equal(backbone.to_conv4_3[0].weight, state["features.0.weight"])
    assert torch.equal(backbone.to_conv4_3[21].weight, state["features.21.weight"])  # conv4_3
    assert torch.equal(backbone.to_fc7[5].bias, state["features.28.bias"])  # conv5_3

    images = torch.randn(1, 3, 64, 64)  # a multiple of 16: ceil-mode pooling (ours) equals torchvision's floor mode
    with torch.no_grad():
        conv4_3 = backbone.to_conv4_3(images)
        assert torch.allclose(conv4_3, vgg.features[:23](images), atol=1e-5)
        assert torch.allclose(backbone.to_fc7[:7](conv4_3), vgg.features[23:30](conv4_3), atol=1e-5)

    conv6, conv7 = backbone.to_fc7[8], backbone.to_fc7[10]
    # conv6[o, c, i, j] is fc6's weight for output 4o, channel c, window position (3i, 3j) of the 7x7 pool5 window
    o, c, i, j = torch.meshgrid(*(torch.arange(n) for n in conv6.weight.shape), indexing="ij")
    assert torch.equal(conv6.weight, state["classifier.0.weight"][4 * o, c * 49 + 3 * i * 7 + 3 * j])
    with torch.no_grad():
        # fc6 on a pool5 window holding values at rows/columns 0, 3, 6 only is the dilated 3x3 conv6 on it
        window = torch.zeros(1, 512, 7, 7)
        window[..., ::3, ::3] = torch.randn(1, 512, 3, 3)
        sampled_fc6 = vgg.classifier[0](window.flatten(1))[:, ::4]
        assert torch.allclose(F.conv2d(window, conv6.weight, conv6.bias, dilation=3).flatten(1), sampled_fc6,
                              atol=1e-4)
        # fc7 on a vector that is zero but for every 4th unit is the 1x1 conv7 on those units
        units = torch.zeros(1, 4096)
        units[:, ::4] = torch.randn(1, 1024)
        sampled_fc7 = vgg.classifier[3](units)[:, ::4]
        assert torch.allclose(conv7(units[:, ::4, None, None]).flatten(1), sampled_fc7, atol=1e-5)


def test_pretrained_weights_bring_their_normalisation_and_checkpoints_keep_it(files, tmp_path):
    """ImageNet weights come with ImageNet's mean/std (torchvision's documented values, in pixel units); without
    them SSD keeps the reference's mean pixel; a checkpoint, which forgets the weights file, keeps the former."""
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]) * 255
    model = SSD(variant="ssd300", num_classes=2, backbone_weights=str(files["vgg16"]))
    torch.testing.assert_close(model.pixel_mean.flatten(), imagenet_mean)
    torch.testing.assert_close(model.pixel_std.flatten(), imagenet_std)
    plain = SSD(variant="ssd300", width=0.25, num_classes=2)
    assert plain.pixel_mean.flatten().tolist() == [123.0, 117.0, 104.0]
    assert plain.pixel_std.flatten().tolist() == [1.0] * 3

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "ssd.ckpt", weights_only=True)
    rebuilt = SSD.load_from_checkpoint(tmp_path / "ssd.ckpt")
    assert rebuilt.hparams["backbone_weights"] is None
    assert torch.equal(rebuilt.pixel_mean, model.pixel_mean) and torch.equal(rebuilt.pixel_std, model.pixel_std)


def test_non_finite_tensors_are_left_as_initialised(states, caplog):
    """torchvision's VGG16_Weights.IMAGENET1K_FEATURES has no valid classifier: conv6/conv7 keep their init."""
    state = dict(states["vgg16"])
    state["classifier.0.weight"] = torch.full_like(state["classifier.0.weight"], float("nan"))
    backbone = SSD(variant="ssd300", num_classes=2).network.backbone
    conv6_before = backbone.to_fc7[8].weight.clone()
    with caplog.at_level(logging.WARNING):
        report = load_mapped(backbone, state, backbone.torchvision_mapping(), "features-only")
    assert torch.equal(backbone.to_fc7[8].weight, conv6_before)
    assert torch.equal(backbone.to_fc7[8].bias, state["classifier.0.bias"][::4])
    assert "to_fc7.8.weight" not in report.loaded and "non-finite" in caplog.text


def test_resnet50_file_fills_the_fpn_body_with_torchvisions_fine_tuning_layout(files, states):
    state = states["resnet50"]
    body = build_network("resnet50_fpn", backbone_weights=str(files["resnet50"]), pretrained_layout=True).backbone.body
    for name in ("conv1.weight", "bn1.running_var", "layer2.0.downsample.1.bias", "layer4.2.conv3.weight"):
        assert torch.equal(body.state_dict()[name], state[name]), name
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad

    resnet = reference("resnet50", state)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        stem = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
        expected = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(stem))))
        torch.testing.assert_close(body(images)["3"], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_random_init_keeps_trainable_batch_norm():
    body = build_network("resnet50_fpn").backbone.body
    assert isinstance(body.bn1, nn.BatchNorm2d) and body.conv1.weight.requires_grad


def test_mobilenet_file_fills_faster_rcnn_fpn_body(files, states):
    state = states["mobilenet_v3_large"]
    network = build_network("mobilenet_v3_fpn", fpn_channels=16, representation=32,
                            backbone_weights=str(files["mobilenet_v3_large"]), pretrained_layout=True)
    body = network.backbone.body
    ours = body.state_dict()
    for name in ("0.0.weight", "0.1.running_mean", "7.block.0.1.weight", "16.0.weight", "16.1.running_var"):
        assert torch.equal(ours[name], state[f"features.{name}"]), name
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())

    # torchvision's fasterrcnn_mobilenet_v3_large_fpn: frozen batch norm on ImageNet weights
    mobilenet = reference("mobilenet_v3_large", state, norm_layer=FrozenBatchNorm2d)
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(body(images)["1"], mobilenet.features(images), rtol=1e-4, atol=1e-5)


def test_mobilenet_file_fills_ssdlite_regrouped_backbone(files, states):
    state = states["mobilenet_v3_large"]
    backbone = SSD(variant="ssdlite", num_classes=2, backbone_weights=str(files["mobilenet_v3_large"])).network.backbone
    mobilenet = reference("mobilenet_v3_large", state)  # its batch norm eps is SSDLite's
    last_stride_2 = [i for i, block in enumerate(mobilenet.features)
                     if any(getattr(conv, "stride", None) == (2, 2) for conv in block.modules())][-1]
    assert torch.equal(backbone.to_stride_16[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(backbone.to_stride_16[-1][0].weight, state[f"features.{last_stride_2}.block.0.0.weight"])
    assert torch.equal(backbone.to_stride_32[-1][1].running_var, state["features.16.1.running_var"])

    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        first, second = backbone.eval()(images)
        before = mobilenet.features[:last_stride_2](images)
        torch.testing.assert_close(first, mobilenet.features[last_stride_2].block[0](before), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second, mobilenet.features(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V2", "MobileNet_V3_Large_Weights.IMAGENET1K_V2"])
def test_a_weights_name_loads_the_file_from_the_torch_hub_cache(files, states, offline, name):
    offline.mkdir(parents=True)
    url = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V2.url
    shutil.copy(files["mobilenet_v3_large"], offline / Path(url).name)
    model = SSD(variant="ssdlite", num_classes=2, backbone_weights=name)
    weight = states["mobilenet_v3_large"]["features.1.block.0.0.weight"]
    assert torch.equal(model.network.backbone.to_stride_16[1].block[0][0].weight, weight)


def small_mobilenet_frcnn(backbone_weights: str) -> None:
    build_network("mobilenet_v3_fpn", fpn_channels=16, representation=32, backbone_weights=backbone_weights)


def test_a_weights_name_neither_cached_nor_downloadable_says_where_to_put_the_file(offline):
    with pytest.raises(FileNotFoundError) as error:
        small_mobilenet_frcnn("IMAGENET1K_V1")
    message = str(error.value)
    file = Path(torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1.url).name
    assert f"{file} is not in torch's cache" in message and str(offline / file) in message
    assert f"model.backbone_weights=/path/to/{file}" in message


@pytest.mark.parametrize(
    "weights, message",
    [
        ("IMAGENET1K_V9", "use one of DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"),
        ("ResNet50_Weights.IMAGENET1K_V1", "for another network"),
        ("missing/mobilenet.pth", "no file at missing/mobilenet.pth"),
    ],
)
def test_bad_weights_names_and_paths_are_clear_errors(offline, weights, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        small_mobilenet_frcnn(weights)


def test_a_file_of_another_network_loads_nothing_and_says_so(files):
    with pytest.raises(ValueError, match="no tensor of .* fits this backbone"):
        small_mobilenet_frcnn(str(files["vgg16"]))


@pytest.mark.parametrize("variant", ["ssd300", "ssdlite"])
def test_a_width_multiplier_cannot_take_imagenet_weights(files, variant):
    source = files["mobilenet_v3_large" if variant == "ssdlite" else "vgg16"]
    with pytest.raises(ValueError, match="width=0.5; set model.width=1.0"):
        SSD(variant=variant, width=0.5, num_classes=2, backbone_weights=str(source))


def test_model_config_with_backbone_weights_composes_and_builds(files, states, cfg_train):
    cfg = cfg_train("model=faster_rcnn_mobilenet", "model.width=1.0",
                    f"model.backbone_weights={files['mobilenet_v3_large']}", "model.fpn_channels=16",
                    "model.representation=32")
    detector = build_model(cfg, num_classes=3, class_names=["a", "b", "c"])
    state = states["mobilenet_v3_large"]
    assert torch.equal(detector.backbone.body.state_dict()["4.block.1.0.weight"], state["features.4.block.1.0.weight"])
    assert isinstance(detector.backbone.body["0"][1], FrozenBatchNorm2d)


def test_a_checkpoint_rebuilds_without_the_weights_file(files, tmp_path):
    source = tmp_path / "mobilenet.pth"
    shutil.copy(files["mobilenet_v3_large"], source)
    model = FasterRCNN(backbone="mobilenet_v3_fpn", fpn_channels=16, representation=32, num_classes=2,
                       backbone_weights=str(source))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "detector.ckpt", weights_only=True)
    source.unlink()

    rebuilt = FasterRCNN.load_from_checkpoint(tmp_path / "detector.ckpt")  # strict: the same layout
    assert model.hparams["backbone_weights"] == str(source) and rebuilt.hparams["backbone_weights"] is None
    assert isinstance(rebuilt.backbone.body["0"][1], FrozenBatchNorm2d)
    assert torch.equal(rebuilt.backbone.body["0"][0].weight, model.backbone.body["0"][0].weight)
