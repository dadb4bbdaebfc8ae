"""A second reading of Darknet, written from its C sources and not from lightning_det: the cfg text format, the
``.weights`` layout, the forward pass of the layers yolov3.cfg and yolov3-tiny.cfg use, and the detection step of
``darknet detector valid``. The equivalence test holds our YOLOv3 against it, so it imports nothing of
lightning_det's Darknet code (network, backbone, weight reader).

Sources read (pjreddie/darknet, master): parser.c (cfg keys, defaults, ``load_weights``), convolutional_layer.c,
batchnorm_layer.c and blas.c / blas_kernels.cu (normalisation), activations.h (leaky), maxpool_layer.c,
route_layer.c, shortcut_layer.c, upsample_layer.c, yolo_layer.c (``get_yolo_box``, ``get_yolo_detections``) and
box.c (``do_nms_sort``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from darknet_sections import yolov3_cfg, yolov3_tiny_3l_cfg, yolov3_tiny_cfg
from torch import Tensor
from torchvision.ops import batched_nms

# The anchors and per-[yolo] masks (coarsest level first, as in the cfg) of Darknet's COCO models.
YOLOV3_ANCHORS = [10, 13, 16, 30, 33, 23, 30, 61, 62, 45, 59, 119, 116, 90, 156, 198, 373, 326]
YOLOV3_MASKS = [[6, 7, 8], [3, 4, 5], [0, 1, 2]]
TINY_ANCHORS = [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319]
# yolov3-tiny.weights was trained with ``mask = 1,2,3`` on its stride-16 [yolo] (pjreddie's first yolov3-tiny.cfg,
# commit 481d9d98). The cfg was changed to 0,1,2 later (f86901f6) but the published weights were not retrained:
# Ultralytics measured COCO mAP 0.332 with 1,2,3 and 0.178 with 0,1,2 (ultralytics/yolov3#256, #421), and
# AlexeyAB's darknet keeps 1,2,3 for these weights (AlexeyAB/darknet#1341, #2949).
TINY_MASKS = [[3, 4, 5], [1, 2, 3]]
# yolov3-tiny_3l.cfg (AlexeyAB's darknet): nine anchors over three [yolo] layers, coarsest first.
TINY_3L_ANCHORS = [4, 7, 7, 15, 13, 25, 25, 42, 41, 67, 75, 94, 91, 162, 158, 205, 250, 332]
TINY_3L_MASKS = [[6, 7, 8], [3, 4, 5], [0, 1, 2]]

# Darknet's leaky slope (activations.h: ``x > 0 ? x : .1 * x``).
LEAKY_SLOPE = 0.1
# Batch norm at inference. Darknet's GPU path (blas_kernels.cu ``normalize_kernel``) and its cuDNN training use
# ``(x - mean) / sqrt(var + .00001)``; its CPU path (blas.c ``normalize_cpu``) uses ``(x - mean) / (sqrt(var)
# + .000001)``. The weights were trained on GPUs, so "gpu" is the reference; "cpu" is the other reading.
BN_FORMULAS = ("gpu", "cpu")


def darknet_cfg(variant: str, classes: int = 80, size: int = 416, width: float = 1.0) -> str:
    """The text of yolov3.cfg (``variant="yolov3"``), yolov3-tiny.cfg (``"tiny"``) or yolov3-tiny_3l.cfg
    (``"tiny3"``), inference part of [net].

    ``width`` below 1 thins every conv but the predictions (``filters * width`` rounded up to a multiple of 8, at
    least 8): the same depth at a fraction of the cost, for our ``model.width``."""
    sections, anchors, masks = {
        "yolov3": (yolov3_cfg(), YOLOV3_ANCHORS, YOLOV3_MASKS),
        "tiny": (yolov3_tiny_cfg(), TINY_ANCHORS, TINY_MASKS),
        "tiny3": (yolov3_tiny_3l_cfg(), TINY_3L_ANCHORS, TINY_3L_MASKS),
    }[variant]
    lines = ["[net]", "batch=1", "subdivisions=1", f"width={size}", f"height={size}", "channels=3", ""]
    yolo = 0
    for section in sections:
        kind = section[0]
        if kind == "conv":
            _, filters, ksize, stride, bn = section
            if filters == "P":
                filters = len(masks[yolo]) * (5 + classes)
            elif width != 1.0:
                filters = max(8, math.ceil(filters * width / 8) * 8)
            lines += ["[convolutional]", *(["batch_normalize=1"] if bn else []), f"filters={filters}",
                      f"size={ksize}", f"stride={stride}", "pad=1", f"activation={'leaky' if bn else 'linear'}"]
        elif kind == "shortcut":
            lines += ["[shortcut]", "from=-3", "activation=linear"]
        elif kind == "route":
            lines += ["[route]", "layers = " + ", ".join(str(i) for i in section[1])]
        elif kind == "upsample":
            lines += ["[upsample]", "stride=2"]
        elif kind == "maxpool":
            lines += ["[maxpool]", f"size={section[1]}", f"stride={section[2]}"]
        elif kind == "yolo":
            lines += ["[yolo]", "mask = " + ",".join(map(str, masks[yolo])),
                      "anchors = " + ",  ".join(f"{w},{h}" for w, h in zip(anchors[::2], anchors[1::2])),
                      f"classes={classes}", f"num={len(anchors) // 2}", "jitter=.3", "ignore_thresh = .7",
                      "truth_thresh = 1", "random=1"]
            yolo += 1
        else:
            raise ValueError(f"unknown section {section}")
        lines.append("")
    return "\n".join(lines)


def parse_cfg(text: str) -> list[dict[str, str]]:
    """``[section]`` headers and ``key=value`` lines (``#`` comments) as a list of dicts with a ``"type"`` key."""
    sections: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append({"type": line.strip("[]").strip()})
        else:
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
    return sections


@dataclass
class Convolutional:
    """``[convolutional]``: its settings and, in ``load_convolutional_weights`` order, its tensors."""

    in_channels: int
    filters: int
    size: int
    stride: int
    padding: int  # parser.c: ``pad=1`` means ``size / 2``
    batch_normalize: bool
    activation: str
    biases: Tensor = field(init=False)  # the conv bias, or BN's beta when batch_normalize
    scales: Tensor | None = field(init=False)  # BN's gamma
    rolling_mean: Tensor | None = field(init=False)
    rolling_variance: Tensor | None = field(init=False)
    weights: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.biases = torch.zeros(self.filters)
        bn = self.batch_normalize
        self.scales = torch.ones(self.filters) if bn else None
        self.rolling_mean = torch.zeros(self.filters) if bn else None
        self.rolling_variance = torch.ones(self.filters) if bn else None
        self.weights = torch.zeros(self.filters, self.in_channels, self.size, self.size)

    def file_tensors(self) -> list[str]:
        """The attribute names in the order Darknet reads and writes them."""
        bn = ["scales", "rolling_mean", "rolling_variance"] if self.batch_normalize else []
        return ["biases", *bn, "weights"]

    def forward(self, x: Tensor, bn_formula: str = "gpu") -> Tensor:
        x = F.conv2d(x, self.weights, stride=self.stride, padding=self.padding)
        if self.batch_normalize:
            mean, var = self.rolling_mean[:, None, None], self.rolling_variance[:, None, None]
            if bn_formula == "gpu":
                x = (x - mean) / torch.sqrt(var + 0.00001)
            else:
                x = (x - mean) / (torch.sqrt(var) + 0.000001)
            x = x * self.scales[:, None, None]
        x = x + self.biases[:, None, None]
        if self.activation == "leaky":
            return torch.where(x > 0, x, LEAKY_SLOPE * x)
        assert self.activation == "linear", self.activation
        return x


@dataclass
class Yolo:
    """``[yolo]``: the anchors (pixels of the network input) its ``mask`` selects, and the class count."""

    anchors: list[tuple[float, float]]
    classes: int


@dataclass
class Layer:
    kind: str
    conv: Convolutional | None = None
    yolo: Yolo | None = None
    sources: list[int] = field(default_factory=list)  # absolute indices (route, shortcut)
    size: int = 0  # maxpool
    stride: int = 0  # maxpool, upsample
    padding: int = 0  # maxpool


class DarknetNetwork:
    """A cfg built layer by layer in cfg order, as ``parse_network_cfg`` does, with Darknet's forward rules."""

    def __init__(self, cfg: str) -> None:
        sections = parse_cfg(cfg)
        net = sections[0]
        assert net["type"] == "net", "a cfg starts with [net]"
        self.width, self.height, channels = int(net["width"]), int(net["height"]), int(net.get("channels", 3))
        self.layers: list[Layer] = []
        out_channels: list[int] = []
        c = channels
        for s in sections[1:]:
            kind, index = s["type"], len(self.layers)
            if kind == "convolutional":
                size = int(s.get("size", 1))
                conv = Convolutional(
                    in_channels=c, filters=int(s.get("filters", 1)), size=size, stride=int(s.get("stride", 1)),
                    padding=size // 2 if int(s.get("pad", 0)) else int(s.get("padding", 0)),
                    batch_normalize=bool(int(s.get("batch_normalize", 0))),
                    activation=s.get("activation", "logistic"),
                )
                layer, c = Layer(kind, conv=conv), conv.filters
            elif kind == "shortcut":
                source = int(s["from"])
                source = source if source >= 0 else index + source
                assert out_channels[source] == c and s.get("activation", "linear") == "linear"
                layer = Layer(kind, sources=[source])
            elif kind == "route":
                sources = [int(v) for v in s["layers"].split(",")]
                sources = [v if v >= 0 else index + v for v in sources]
                layer, c = Layer(kind, sources=sources), sum(out_channels[v] for v in sources)
            elif kind == "upsample":
                layer = Layer(kind, stride=int(s.get("stride", 2)))
            elif kind == "maxpool":
                stride = int(s.get("stride", 1))
                size = int(s.get("size", stride))
                layer = Layer(kind, size=size, stride=stride, padding=int(s.get("padding", size - 1)))
            elif kind == "yolo":
                mask = [int(v) for v in s["mask"].split(",")]
                values = [float(v) for v in s["anchors"].split(",")]
                classes = int(s.get("classes", 20))
                assert c == len(mask) * (5 + classes), f"[yolo] {index} gets {c} channels"
                layer = Layer(kind, yolo=Yolo([(values[2 * m], values[2 * m + 1]) for m in mask], classes))
            else:
                raise ValueError(f"the reference reads no [{kind}] layer")
            self.layers.append(layer)
            out_channels.append(c)

    def to(self, dtype: torch.dtype) -> DarknetNetwork:
        """Every tensor in ``dtype`` (float64 runs both sides free of float32 rounding)."""
        for conv in self.convolutionals:
            for name in conv.file_tensors():
                setattr(conv, name, getattr(conv, name).to(dtype))
        return self

    @property
    def convolutionals(self) -> list[Convolutional]:
        return [layer.conv for layer in self.layers if layer.conv is not None]

    @property
    def yolos(self) -> list[Yolo]:
        return [layer.yolo for layer in self.layers if layer.yolo is not None]

    def forward(
        self, x: Tensor, bn_formula: str = "gpu", before_conv: Callable[[Convolutional, Tensor], None] | None = None
    ) -> list[Tensor]:
        """``x`` ``[B, 3, H, W]`` in 0..1 -> each [yolo] layer's input ``[B, A * (5 + C), h, w]`` in cfg order (the
        raw conv output: Darknet's [yolo] then applies the logistic to x, y, objectness and classes in place).
        ``before_conv(conv, input)`` runs before each conv (the test's weight generator uses it)."""
        assert bn_formula in BN_FORMULAS
        outputs: list[Tensor] = []
        yolo_inputs: list[Tensor] = []
        for layer in self.layers:
            if layer.kind == "convolutional":
                if before_conv is not None:
                    before_conv(layer.conv, x)
                x = layer.conv.forward(x, bn_formula)
            elif layer.kind == "shortcut":  # shortcut_layer.c: copy the previous output, add the ``from`` layer
                x = x + outputs[layer.sources[0]]
            elif layer.kind == "route":
                x = torch.cat([outputs[i] for i in layer.sources], 1)
            elif layer.kind == "upsample":  # blas.c upsample_cpu: out[j][i] = in[j / s][i / s]
                x = x.repeat_interleave(layer.stride, 2).repeat_interleave(layer.stride, 3)
            elif layer.kind == "maxpool":
                x = darknet_maxpool(x, layer.size, layer.stride, layer.padding)
            elif layer.kind == "yolo":
                yolo_inputs.append(x)
            outputs.append(x)
        return yolo_inputs

    def write_weights(self, path: Path, version: tuple[int, int, int] = (0, 2, 0), seen: int = 0) -> None:
        """Darknet's ``save_weights``: int32 major, minor, revision; ``seen`` (int64 from 0.2 on); then per conv
        in cfg order its tensors as little-endian float32."""
        with open(path, "wb") as f:
            np.asarray(version, dtype="<i4").tofile(f)
            np.asarray([seen], dtype="<i8" if seen_is_int64(*version[:2]) else "<i4").tofile(f)
            for conv in self.convolutionals:
                for name in conv.file_tensors():
                    getattr(conv, name).numpy().astype("<f4").tofile(f)

    def load_weights(self, path: Path) -> dict[str, int]:
        """Darknet's ``load_weights``; also refuses a file with bytes left over (Darknet itself does not check)."""
        data = Path(path).read_bytes()
        major, minor, revision = (int(v) for v in np.frombuffer(data, dtype="<i4", count=3))
        wide = seen_is_int64(major, minor)
        seen = int(np.frombuffer(data, dtype="<i8" if wide else "<i4", count=1, offset=12)[0])
        values = np.frombuffer(data, dtype="<f4", offset=20 if wide else 16)
        position = 0
        for conv in self.convolutionals:
            for name in conv.file_tensors():
                shape = getattr(conv, name).shape
                count = math.prod(shape)
                assert position + count <= values.size, "the file ends before the network's last conv"
                setattr(conv, name, torch.from_numpy(values[position:position + count].copy()).view(shape))
                position += count
        assert position == values.size, f"{values.size - position} floats left over after the last conv"
        return {"major": major, "minor": minor, "revision": revision, "seen": seen}


def seen_is_int64(major: int, minor: int) -> bool:
    """parser.c: ``if ((major * 10 + minor) >= 2 && major < 1000 && minor < 1000)`` the count is a size_t."""
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def darknet_maxpool(x: Tensor, size: int, stride: int, padding: int) -> Tensor:
    """maxpool_layer.c: output ``(w + padding - size) / stride + 1``; window ``(i * stride + n - padding / 2)``
    (C's ``-l.pad / 2``); neighbours outside the map are skipped (they count as ``-FLT_MAX``)."""
    before = padding // 2
    x = F.pad(x, (before, padding - before, before, padding - before), value=float("-inf"))
    return F.max_pool2d(x, size, stride)


def randomise(network: DarknetNetwork, image: Tensor, seed: int) -> None:
    """Random weights that keep every layer's activations near unit scale on ``image``, so 75 layers neither
    explode nor die and the outputs spread over the whole range of scores and box sizes.

    Each conv gets He-scaled weights. A BN conv's output channels are then scaled so that their variance on the
    image is log-uniform in [1e-3, 10] (running variances of trained networks span decades too), and its running
    statistics are the ones the image produces, perturbed, so the normalised output has the BN's random gamma and
    beta as spread and offset. A prediction conv is scaled per channel to Darknet-like logits: centre offsets
    of spread 1, log sizes of spread 0.4, objectness around -3 (spread 1.5) and classes around -2 (spread 1), so
    the best scores stay well below 1 and differ."""
    generator = torch.Generator().manual_seed(seed)
    prediction_classes: dict[int, int] = {}  # id of the conv right before each [yolo] -> its class count
    previous: Convolutional | None = None
    for layer in network.layers:
        if layer.conv is not None:
            previous = layer.conv
        elif layer.yolo is not None:
            prediction_classes[id(previous)] = layer.yolo.classes

    def uniform(n: int, low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    def fill(conv: Convolutional, x: Tensor) -> None:
        fan_in = conv.in_channels * conv.size * conv.size
        weights = torch.randn(conv.weights.shape, generator=generator) * math.sqrt(2.0 / fan_in)
        if conv.batch_normalize:
            y = F.conv2d(x, weights, stride=conv.stride, padding=conv.padding)
            variance = torch.exp(uniform(conv.filters, math.log(1e-3), math.log(10.0)))
            gain = (variance / y.var((0, 2, 3)).clamp(min=1e-12)).sqrt()
            weights *= gain[:, None, None, None]
            mean = y.mean((0, 2, 3)) * gain
            conv.rolling_mean = mean + 0.1 * variance.sqrt() * torch.randn(conv.filters, generator=generator)
            conv.rolling_variance = variance * torch.exp(uniform(conv.filters, -0.3, 0.3))
            conv.scales = uniform(conv.filters, 0.5, 1.5)
            conv.biases = uniform(conv.filters, -0.5, 0.5)
        else:
            classes = prediction_classes[id(conv)]
            role = torch.arange(conv.filters) % (5 + classes)
            spread = torch.where(role < 2, 1.0, torch.where(role < 4, 0.4, torch.where(role == 4, 1.5, 1.0)))
            centre = torch.where(role < 4, 0.0, torch.where(role == 4, -3.0, -2.0))
            y = F.conv2d(x, weights, stride=conv.stride, padding=conv.padding)
            gain = spread / y.std((0, 2, 3))
            weights *= gain[:, None, None, None]
            conv.biases = centre - y.mean((0, 2, 3)) * gain + 0.1 * torch.randn(conv.filters, generator=generator)
        conv.weights = weights

    with torch.no_grad():
        network.forward(image, before_conv=fill)


def darknet_detections(
    yolo_inputs: list[Tensor], yolos: list[Yolo], net_size: tuple[int, int], thresh: float, nms: float,
    pre_nms_topk: int | None = None, max_detections: int | None = None, clip_before_nms: bool = True,
) -> list[dict[str, Tensor]]:
    """Per image ``{"boxes" xyxy, "scores", "labels"}`` in network-input pixels, the way ``darknet detector valid``
    gets them: ``get_yolo_detections`` (box ``((col + sigmoid(tx)) / lw, (row + sigmoid(ty)) / lh,
    exp(tw) * anchor_w / net_w, exp(th) * anchor_h / net_h)`` relative to the network input; a box needs
    objectness above ``thresh``, and each class keeps ``objectness * sigmoid(class)`` where that is above
    ``thresh``), then ``do_nms_sort`` (per class, greedy, suppress at IoU above ``nms``).

    Not Darknet's and only for matching our decoder: ``pre_nms_topk`` (best (box, class) pairs per image entering
    NMS), ``max_detections`` (kept per image after NMS) and ``clip_before_nms`` (Darknet clips boxes to the image
    only when it writes them, after NMS)."""
    net_h, net_w = net_size
    results = []
    for b in range(yolo_inputs[0].shape[0]):
        boxes, probs = [], []
        for raw, yolo in zip(yolo_inputs, yolos):
            anchors = torch.tensor(yolo.anchors)
            _, _, lh, lw = raw.shape
            p = raw[b].view(len(yolo.anchors), 5 + yolo.classes, lh, lw).permute(0, 2, 3, 1)  # [A, lh, lw, 5 + C]
            row, col = torch.meshgrid(torch.arange(lh), torch.arange(lw), indexing="ij")
            x = (col + p[..., 0].sigmoid()) / lw
            y = (row + p[..., 1].sigmoid()) / lh
            w = p[..., 2].exp() * anchors[:, 0, None, None] / net_w
            h = p[..., 3].exp() * anchors[:, 1, None, None] / net_h
            objectness = p[..., 4].sigmoid()
            prob = objectness[..., None] * p[..., 5:].sigmoid()
            prob = torch.where((objectness[..., None] > thresh) & (prob > thresh), prob, torch.zeros(()))
            xyxy = torch.stack(((x - w / 2) * net_w, (y - h / 2) * net_h, (x + w / 2) * net_w, (y + h / 2) * net_h), -1)
            boxes.append(xyxy.reshape(-1, 4))
            probs.append(prob.reshape(-1, yolo.classes))
        boxes_all, probs_all = torch.cat(boxes), torch.cat(probs)
        box_index, labels = torch.nonzero(probs_all, as_tuple=True)
        scores = probs_all[box_index, labels]
        if pre_nms_topk is not None and len(scores) > pre_nms_topk:
            scores, best = scores.topk(pre_nms_topk)
            box_index, labels = box_index[best], labels[best]
        candidates = boxes_all[box_index]
        if clip_before_nms:
            candidates = clip(candidates, net_w, net_h)
        keep = batched_nms(candidates, scores, labels, nms)[:max_detections]
        results.append({"boxes": clip(candidates[keep], net_w, net_h), "scores": scores[keep], "labels": labels[keep]})
    return results


def clip(boxes: Tensor, width: int, height: int) -> Tensor:
    """xyxy boxes clipped to the image, as ``print_cocos`` clips what it writes."""
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limits)
