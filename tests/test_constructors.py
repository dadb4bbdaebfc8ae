"""No constructor in the package takes more than a reader can hold: at most 12 parameters (a dataclass's fields
count as its constructor's), read from the source so a new class is held to it without being imported."""

import ast
from pathlib import Path

from runs import REPO

MOST = 12


def is_dataclass(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)) == "dataclass":
            return True
    return False


def constructor_parameters(node: ast.ClassDef) -> int | None:
    """Named parameters of ``__init__`` without ``self``, or a dataclass's fields (``ClassVar`` ones are not)."""
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            arguments = item.args
            return len(arguments.posonlyargs) + len(arguments.args) + len(arguments.kwonlyargs) - 1
    if is_dataclass(node):
        return sum(isinstance(item, ast.AnnAssign) and "ClassVar" not in ast.unparse(item.annotation)
                   for item in node.body)
    return None


def constructor_sizes(package: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and (count := constructor_parameters(node)) is not None:
                sizes[f"{path.relative_to(package).as_posix()}:{node.name}"] = count
    return sizes


def test_no_constructor_takes_more_than_twelve_parameters():
    sizes = constructor_sizes(REPO / "lightning_det")
    too_many = {name: count for name, count in sizes.items() if count > MOST}
    assert not too_many, too_many


def test_the_scan_counts_fields_and_parameters(tmp_path):
    (tmp_path / "example.py").write_text(
        "from dataclasses import dataclass\nfrom typing import ClassVar\n\n"
        "@dataclass(frozen=True)\nclass Settings:\n    choices: ClassVar[dict] = {}\n    a: int = 1\n    b: int = 2\n\n"
        "class Module:\n    def __init__(self, a, b=1, *args, c, **kwargs):\n        pass\n"
    )
    assert constructor_sizes(tmp_path) == {"example.py:Settings": 2, "example.py:Module": 3}
