"""Renamed settings across the families: the table can be trusted, and the command line says where a key went."""

import inspect
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from runs import REPO

from lightning_det.checks.config import ConfigValueError, check_renamed, check_renamed_overrides, renamed_settings
from lightning_det.models import SSD, FasterRCNN, YOLOv3

FAMILIES = (YOLOv3, SSD, FasterRCNN)


def test_no_renamed_key_is_still_a_setting_of_another_family():
    """The command line is checked before the model is known, against every family's table; that is only right
    while no family still takes one of the old keys at its top level."""
    live = {name for family in FAMILIES for name in inspect.signature(family.__init__).parameters}
    live |= set(inspect.signature(YOLOv3.__mro__[1].__init__).parameters)  # the base's settings
    renamed = {old for family in FAMILIES for old in family.renamed}
    assert renamed and not renamed & live, sorted(renamed & live)


def test_an_old_key_on_the_command_line_stops_before_hydra_with_status_2():
    done = subprocess.run([sys.executable, "train.py", "model.nms_topk=5"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: model.nms_topk=5: model.nms_topk was renamed: YOLOv3 uses model.decoder.max_detections; "
                     "SSD uses model.decoder.pre_nms_topk"], done.stderr


def test_the_changelog_lists_every_renamed_setting_and_no_other():
    """CHANGELOG.md's table, read back: a key renamed in the code and not in the changelog (or the reverse) fails."""
    rows = [line.split("|")[1:4] for line in (REPO / "CHANGELOG.md").read_text().splitlines()
            if line.startswith("| `")]
    listed = {(old.strip(" `"), family.strip(), new.strip(" `")) for old, family, new in rows}
    in_code = {(old, family or "all", new) for old, moves in renamed_settings().items() for family, new in moves}
    assert listed == in_code


def test_a_moved_data_key_on_the_command_line_names_its_node():
    done = subprocess.run([sys.executable, "train.py", "data.num_workers=4"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: data.num_workers=4: data.num_workers was renamed: use data.loader.num_workers"], done.stderr


def test_a_data_config_with_an_old_key_is_refused_and_its_new_node_is_not():
    with pytest.raises(ConfigValueError, match=r"data.sampler was renamed: use data.sampler.kind"):
        check_renamed(OmegaConf.create({"data": {"sampler": "repeat_factor"}}))
    with pytest.raises(ConfigValueError, match=r"data.skip_invalid was renamed: use data.reading.skip_invalid"):
        check_renamed(OmegaConf.create({"data": {"skip_invalid": True}}))
    check_renamed(OmegaConf.create({"data": {"sampler": {"kind": "repeat_factor"}, "reading": {"skip_invalid": True}}}))


def test_a_key_under_a_moved_node_is_refused_with_the_node_new_place():
    with pytest.raises(ConfigValueError, match="data.train_transform was renamed: use data.pipeline.train_transform"):
        check_renamed_overrides(["data.train_transform.flip=0"])
    check_renamed_overrides(["data.sampler.min_steps_per_epoch=0", "data.pipeline.train_transform.flip=0"])


def test_the_zoom_rule_key_names_the_augmentation_rule():
    with pytest.raises(ConfigValueError, match="full_zoom_passes was renamed: use data.pipeline.full_augment_passes"):
        check_renamed_overrides(["data.pipeline.full_zoom_passes=0"])
    with pytest.raises(ConfigValueError, match="full_zoom_passes was renamed: use data.pipeline.full_augment_passes"):
        check_renamed(OmegaConf.create({"data": {"pipeline": {"full_zoom_passes": 50}}}))
    check_renamed_overrides(["data.pipeline.full_augment_passes=0"])
