"""Every ``train.py`` and ``python -m lightning_det.tools.<tool>`` command of the README and docs/ composes, as
``--cfg job`` would compose it, and passes the checks a run makes before it builds anything (renamed keys, value
types): a documented command that a rename or a new check broke fails here, not in a reader's terminal."""

from __future__ import annotations

import re
import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from runs import REPO, compose_config

from lightning_det.checks.config import check_config, check_renamed_overrides

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The Hydra entry points and their primary configs (convert is argparse and has its own tests).
CONFIGS = {"train.py": "train", "lightning_det.tools.anchors": "train", "lightning_det.tools.browse": "browse",
           "lightning_det.tools.evaluate": "evaluate", "lightning_det.tools.export": "export",
           "lightning_det.tools.predict": "predict"}
# A command at the start of a line: after a prompt, environment variables or a launcher (srun, torchrun ...).
ENTRY = re.compile(r"^\s*(?:\$ )?(?:[A-Z_]+=\S* )*(?:srun )?"
                   r"(?:torchrun .*? (train\.py)|python3? (train\.py)|python3? -m (lightning_det\.tools\.\w+)) ?")
PLACEHOLDER = re.compile(r"<[^<>]+>")  # <folder>, <checkpoint>: what the reader fills in


def documented_commands() -> list[tuple[str, str, str]]:
    """``(page, entry point, arguments)`` of each command in a code block, continuation lines joined."""
    found = []
    for page in PAGES:
        text = page.read_text()
        if page.name == "adding.md":  # its commands need the example's own files: tests/test_docs_adding.py
            continue
        code = "\n".join(re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
                         + [line[4:] for line in text.splitlines() if line.startswith("    ")])
        for line in PLACEHOLDER.sub("x", re.sub(r"\s*\\\n\s*", " ", code)).splitlines():
            match = ENTRY.match(line)
            if match is None:
                continue
            entry = next(group for group in match.groups() if group)
            if entry in CONFIGS:
                found.append((page.name, entry, line[match.end():].split(" #")[0].strip()))
    return found


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun's first job: each sweep (``a,b``) replaced by its first value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else text
            for o, text in zip(parsed, overrides)]


COMMANDS = documented_commands()


def test_the_pages_document_commands_of_every_entry_point():
    assert {entry for _, entry, _ in COMMANDS} >= {"train.py", "lightning_det.tools.evaluate",
                                                   "lightning_det.tools.predict", "lightning_det.tools.export"}
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("page, entry, arguments", COMMANDS, ids=[f"{p}:{a[:60]}" for p, _, a in COMMANDS])
def test_documented_command_composes_and_passes_the_checks(tmp_path, page, entry, arguments):
    words = [word for word in shlex.split(arguments) if word not in ("-m", "--multirun")]
    overrides = first_of_each_sweep([word for word in words if "=" in word])
    check_renamed_overrides(overrides)
    cfg = compose_config(CONFIGS[entry], *overrides, run_dir=tmp_path)  # as the run has it
    if entry in ("train.py", "lightning_det.tools.anchors"):
        check_config(cfg)
