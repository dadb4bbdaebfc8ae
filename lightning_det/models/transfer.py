"""What a weight transfer loaded (:class:`TransferReport`), and how a pretrained class head carries over to another
class list: which of your classes the source knows, and the rows of its head that hold them.

A detector's class-indexed tensors (YOLO's prediction convs, SSD's confidence convs, Faster R-CNN's class scores
and per-class boxes) lay their classes out the same way along the first dimension: ``groups`` blocks (one per
anchor), each of ``lead`` rows that belong to no class (background, box, objectness), then ``per_class`` rows for
every class. :class:`ClassRows` names that layout, and :func:`transfer_rows` copies the rows of matched classes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

#: torchvision's COCO label space: index 0 the background, then COCO's category ids 1..90 with "N/A" at the ids
#: COCO never used. Every torchvision COCO detector shares it.
TORCHVISION_COCO = list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
#: Placeholders of a label space: never a class of yours.
PLACEHOLDERS = {"__background__", "N/A"}
#: COCO's 80 classes in category-id order: Darknet's ``coco.names`` (whose spellings differ, see ``SYNONYMS``).
COCO_80 = [name for name in TORCHVISION_COCO if name not in PLACEHOLDERS]

#: Other names of COCO classes, as labelling tools, Pascal VOC and Darknet's coco.names spell them.
SYNONYMS = {
    "people": "person", "pedestrian": "person", "human": "person", "man": "person", "woman": "person",
    "bike": "bicycle", "motorbike": "motorcycle", "aeroplane": "airplane", "plane": "airplane",
    "aircraft": "airplane", "automobile": "car", "lorry": "truck", "ship": "boat", "hydrant": "fire hydrant",
    "traffic signal": "traffic light", "puppy": "dog", "kitten": "cat", "sofa": "couch", "tvmonitor": "tv",
    "television": "tv", "diningtable": "dining table", "table": "dining table", "pottedplant": "potted plant",
    "plant": "potted plant", "cellphone": "cell phone", "mobile phone": "cell phone", "phone": "cell phone",
    "purse": "handbag", "ball": "sports ball", "doughnut": "donut", "hotdog": "hot dog", "laptop computer": "laptop",
}


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)  # in both, with different shapes (e.g. a new class count)
    excluded: list[str] = field(default_factory=list)  # matched an exclude pattern
    unexpected: list[str] = field(default_factory=list)  # in the file only
    missing: list[str] = field(default_factory=list)  # in the model only: keep their fresh initialisation
    loaded_values: int = 0  # elements of the loaded tensors
    model_values: int = 0  # elements of the model's whole state dict
    classes: str = ""  # what became of the class head (``match_classes``' sentence)

    def summary(self) -> str:
        def names(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f", ... (+{len(items) - 5})" if len(items) > 5 else "")

        lines = [f"loaded {len(self.loaded)} tensors"]
        for label, items in (
            ("skipped (shape differs)", self.skipped_shape),
            ("excluded by pattern", self.excluded),
            ("in the file only", self.unexpected),
            ("missing from the file (left as initialised)", self.missing),
        ):
            if items:
                lines.append(f"{label}: {len(items)}: {names(items)}")
        return "\n".join(lines + ([self.classes] if self.classes else []))


def canonical(name: str) -> str:
    """Lower case, separators as single spaces: ``"Traffic_Light"`` -> ``"traffic light"``."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def source_class_for(name: str, source: Sequence[str]) -> int | None:
    """The index in ``source`` of the class ``name`` means: the same name, a listed synonym, or a plural of
    either ("cars", "buses"); None when the source does not have it."""
    by_name = {canonical(s): i for i, s in enumerate(source) if s not in PLACEHOLDERS}
    wanted = canonical(name)
    candidates = [wanted, wanted.replace(" ", "")]
    for suffix in ("es", "s"):
        if wanted.endswith(suffix):
            candidates.append(wanted[: -len(suffix)])
    for candidate in candidates:
        for option in (candidate, SYNONYMS.get(candidate)):
            if option is not None and canonical(option) in by_name:
                return by_name[canonical(option)]
    return None


def few(names: Sequence[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def match_classes(ours: Sequence[str], source: Sequence[str] | None, source_count: int, mode: str
                  ) -> tuple[list[int | None], str]:
    """For each of ``ours``, the source class whose head rows it takes (None: freshly initialised), and one
    sentence for the log.

    ``mode="auto"``: the head is kept when the source has exactly your classes (in any order; its placeholders
    aside), else re-initialised. ``"by_name"``: each class of yours the source has, by name or synonym, keeps its
    rows; the others start fresh. A source without class names is kept only with your class count.
    """
    if mode not in ("auto", "by_name"):
        raise ValueError(f"init_classes={mode}: use auto or by_name")
    if source is None:
        if source_count == len(ours):
            return list(range(len(ours))), (f"class head kept: the source names no classes and has {source_count}, "
                                             "as many as yours")
        return [None] * len(ours), (f"class head re-initialised: the source has {source_count} unnamed classes, "
                                    f"you have {len(ours)}")
    real = [s for s in source if s not in PLACEHOLDERS]
    exact = [source.index(name) if name in source else None for name in ours]
    if sorted(ours) == sorted(real):
        return exact, f"class head kept: the source has your {len(ours)} classes"
    if mode == "auto":
        found = [name for name in ours if source_class_for(name, source) is not None]
        hint = (f"; init_classes=by_name would keep the rows of {few(found)}" if found else
                "; none of your classes is among them")
        return [None] * len(ours), (f"class head re-initialised: the source's {len(real)} classes ({few(real)}) "
                                    f"are not yours ({few(ours)}){hint}")
    rows = [source_class_for(name, source) for name in ours]
    kept = [f"{name} <- {source[row]}" for name, row in zip(ours, rows) if row is not None]
    fresh = [name for name, row in zip(ours, rows) if row is None]
    return rows, (f"init_classes=by_name: {len(kept)} of your {len(ours)} classes keep the source's head rows"
                  + (f" ({', '.join(kept)})" if kept else "") + (f"; initialised fresh: {', '.join(fresh)}"
                                                                   if fresh else ""))


@dataclass(frozen=True)
class ClassRows:
    """How a class-indexed tensor lays out classes along its first dimension: ``groups`` blocks, each of ``lead``
    rows of no class (background, box, objectness) and then ``per_class`` rows for every class."""

    groups: int = 1
    lead: int = 0
    per_class: int = 1

    def class_count(self, rows: int) -> int:
        """How many classes a tensor of ``rows`` first-dimension rows holds in this layout."""
        return (rows // self.groups - self.lead) // self.per_class

    def rows(self, num_classes: int, classes: Sequence[int | None]) -> tuple[Tensor, Tensor]:
        """Row indices ``(target, source)`` to copy for a target of ``len(classes)`` classes from a source of
        ``num_classes``: every lead row, and the rows of each class mapped to a source class."""
        target, source = [], []
        target_block, source_block = self.lead + len(classes) * self.per_class, self.lead + num_classes * self.per_class
        for group in range(self.groups):
            pairs = [(row, row) for row in range(self.lead)]
            pairs += [(self.lead + ours * self.per_class + k, self.lead + theirs * self.per_class + k)
                      for ours, theirs in enumerate(classes) if theirs is not None for k in range(self.per_class)]
            target += [group * target_block + t for t, _ in pairs]
            source += [group * source_block + s for _, s in pairs]
        return torch.tensor(target, dtype=torch.long), torch.tensor(source, dtype=torch.long)


def transfer_rows(target: Tensor, source: Tensor, layout: ClassRows, classes: Sequence[int | None]) -> Tensor:
    """``target`` (a fresh class-indexed tensor of ``len(classes)`` classes) with the lead rows and the mapped
    classes' rows of ``source`` copied in; unmapped classes keep their fresh values."""
    into, out_of = layout.rows(layout.class_count(source.shape[0]), classes)
    result = target.clone()
    result[into] = source[out_of].to(result.dtype)
    return result


def layer_rows(model: nn.Module, layer: nn.Module, layout: ClassRows) -> dict[str, ClassRows]:
    """``layout`` for the weight and bias of ``layer``, named as in ``model``'s state dict."""
    name = next(n for n, m in model.named_modules() if m is layer)
    return {f"{name}.{tensor}": layout for tensor, _ in layer.named_parameters(recurse=False)}
