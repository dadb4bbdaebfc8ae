"""Read and write Darknet's binary ``.weights`` files for YOLOv3, YOLOv3-tiny and the Darknet-53 backbone.

The format: a header of int32 ``major, minor, revision`` and the number of images seen (int64 from version
0.2 on, int32 before), then for every convolutional layer in cfg order either the BatchNorm ``beta, gamma,
running mean, running variance`` or the conv bias, followed by the conv weights, all float32. Nothing names the
layers, so the only check is the byte count: a file that is too short or too long for the network is refused.
A ``cutoff`` reads or writes only the first N conv layers, as in ``darknet53.conv.74`` (the 52 backbone convs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_det.models.backbones.darknet import ConvBNAct, Darknet53, DarknetTiny
from lightning_det.models.yolov3.network import YOLOv3Network, YOLOv3TinyNetwork

Layer = tuple[nn.Conv2d, nn.BatchNorm2d | None]
HEADER_VERSION = (0, 2, 0)


def _conv_layers(*modules: nn.Module) -> list[Layer]:
    """Conv layers of ``modules`` in registration order, each with its BatchNorm (or None for a biased conv)."""
    layers = []
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, ConvBNAct):
                layers.append((sub[0], sub[1]))
            elif isinstance(sub, nn.Conv2d) and sub.bias is not None:
                layers.append((sub, None))
    return layers


def darknet_layers(network: nn.Module) -> list[Layer]:
    """The conv layers in the order of Darknet's cfg, which visits each head level before the next lateral."""
    if isinstance(network, (Darknet53, DarknetTiny)):
        return _conv_layers(network)
    if isinstance(network, YOLOv3Network):
        return _conv_layers(
            network.backbone,
            network.conv_sets[0], network.outputs[0], network.laterals[0],
            network.conv_sets[1], network.outputs[1], network.laterals[1],
            network.conv_sets[2], network.outputs[2],
        )
    if isinstance(network, YOLOv3TinyNetwork):
        three_levels = (network.lateral8, network.output8) if len(network.strides) == 3 else ()
        return _conv_layers(
            network.backbone, network.neck32, network.output32, network.lateral, network.output16, *three_levels
        )
    raise TypeError(f"no Darknet layer order for {type(network).__name__}")


def _tensors(conv: nn.Conv2d, norm: nn.BatchNorm2d | None) -> list[torch.Tensor]:
    """The tensors of one layer in file order."""
    head = [norm.bias, norm.weight, norm.running_mean, norm.running_var] if norm is not None else [conv.bias]
    return [*head, conv.weight]


def read_darknet_header(path: str | Path) -> tuple[dict[str, int], int]:
    """The header (``major, minor, revision, seen``) and the byte offset of the first weight; one error naming the
    file when it cannot be a ``.weights`` file (empty, too short, an unknown version, a partial float)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(20)
    what = f"init_from={path} ({size} bytes)"
    if len(head) < 12:
        raise ValueError(f"{what} is too short for a Darknet .weights file (its header alone takes 16-20 bytes)")
    major, minor, revision = (int(v) for v in np.frombuffer(head[:12], dtype=np.int32))
    if not (0 <= major <= 1 and 0 <= minor <= 9):
        raise ValueError(
            f"{what} is neither a PyTorch checkpoint nor a Darknet .weights file (header version {major}.{minor})"
        )
    seen_size = 8 if major * 10 + minor >= 2 else 4
    offset = 12 + seen_size
    if size <= offset or (size - offset) % 4:
        raise ValueError(f"{what} is not a whole Darknet .weights file: a {offset}-byte header, then float32 weights")
    seen = np.frombuffer(head[12:offset], dtype=np.int64 if seen_size == 8 else np.int32)[0]
    return {"major": major, "minor": minor, "revision": revision, "seen": int(seen)}, offset


def load_darknet_weights(network: nn.Module, path: str | Path, cutoff: int | None = None) -> dict[str, int]:
    """Fill ``network`` from a ``.weights`` file; returns the header (``major, minor, revision, seen``)."""
    path = Path(path)
    layers = darknet_layers(network)[:cutoff]
    header, offset = read_darknet_header(path)
    values = np.fromfile(path, dtype=np.float32, offset=offset)
    expected = sum(t.numel() for layer in layers for t in _tensors(*layer))
    if values.size != expected and (cutoff is None or values.size < expected):
        raise ValueError(
            f"{path}: holds {values.size} weights but the network's {len(layers)} conv layers take {expected}: "
            "check the variant, the class count (model head) and the anchor count, or pass a cutoff to read "
            "only the backbone"
        )
    offset = 0
    with torch.no_grad():
        for layer in layers:
            for tensor in _tensors(*layer):
                chunk = values[offset: offset + tensor.numel()]
                tensor.copy_(torch.from_numpy(chunk.copy()).view_as(tensor))
                offset += tensor.numel()
    return header


def save_darknet_weights(network: nn.Module, path: str | Path, cutoff: int | None = None, seen: int = 0) -> None:
    """Write ``network`` (or its first ``cutoff`` conv layers) as a version 0.2 ``.weights`` file."""
    with Path(path).open("wb") as f:
        np.array(HEADER_VERSION, dtype=np.int32).tofile(f)
        np.array([seen], dtype=np.int64).tofile(f)
        for layer in darknet_layers(network)[:cutoff]:
            for tensor in _tensors(*layer):
                tensor.detach().cpu().numpy().astype(np.float32).tofile(f)
