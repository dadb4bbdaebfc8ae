"""init_from: tensors with matching name and shape are loaded; a head for another class count is skipped."""

import pytest
import torch
from tiny_detector import TinyDetector

from lightning_det.models.weights import initialise_from, load_matching_weights
from lightning_det.models.yolov3 import YOLOv3
from lightning_det.models.yolov3.darknet_weights import save_darknet_weights


def tiny(num_classes: int, seed: int) -> YOLOv3:
    torch.manual_seed(seed)
    return YOLOv3(variant="tiny", width=0.125, num_classes=num_classes)


def test_an_80_class_checkpoint_initialises_a_20_class_model_but_its_class_rows(tmp_path):
    """A checkpoint that does not name its classes: every tensor of the same shape is loaded; of the prediction
    convs, the box and objectness rows of each anchor are copied and the 20 class rows keep their fresh values."""
    source = tiny(80, seed=0)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "coco.ckpt")
    target = tiny(20, seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    report = load_matching_weights(target, tmp_path / "coco.ckpt")

    after = target.state_dict()
    heads = [name for name in after if name.startswith("network.output") and ".1.conv." in name]
    assert len(heads) == 4  # weight and bias of two levels
    for name, tensor in source.state_dict().items():
        if name in heads:  # [3 anchors x (5 + C), ...]: rows 0-4 of each anchor are box and objectness
            theirs, ours, fresh = (t.view(3, -1, *t.shape[1:]) for t in (tensor, after[name], before[name]))
            assert torch.equal(ours[:, :5], theirs[:, :5]), name
            assert torch.equal(ours[:, 5:], fresh[:, 5:]), name
        else:
            assert torch.equal(after[name], tensor), name
    assert "class head re-initialised: the source has 80 unnamed classes, you have 20" in report.summary()
    assert not report.missing and not report.unexpected and not report.skipped_shape


def test_exclude_patterns_and_plain_state_dicts(tmp_path):
    source = tiny(3, seed=0)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    target = tiny(3, seed=1)
    report = load_matching_weights(target, tmp_path / "weights.pt", exclude=[r"^network\.output"])
    assert report.excluded and all(name.startswith("network.output") for name in report.excluded)
    assert len(report.loaded) + len(report.excluded) == len(source.state_dict())
    excluded = report.excluded[0]
    assert not torch.equal(target.state_dict()[excluded], source.state_dict()[excluded])


def test_a_file_without_tensors_is_rejected_with_its_name(tmp_path):
    torch.save({"optimizer": "sgd"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_matching_weights(tiny(3, seed=0), tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_matching_weights(tiny(3, seed=0), tmp_path / "nothing.pt")


def test_init_from_reads_darknet_files_through_the_detector(tmp_path):
    source, target = tiny(3, seed=0), tiny(3, seed=1)
    save_darknet_weights(source.network, tmp_path / "yolov3-tiny.weights")
    initialise_from(target, tmp_path / "yolov3-tiny.weights")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(a, b), name


def test_init_from_a_foreign_file_without_a_reader_is_refused(tmp_path):
    (tmp_path / "model.weights").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a PyTorch file and TinyDetector reads no other format"):
        initialise_from(TinyDetector(), tmp_path / "model.weights")
