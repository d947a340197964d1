"""Limits that keep the code easy to hold in one's head: no module over 300 lines, no function
over 60 lines (tests excluded)."""

import ast

import pytest
from conftest import ROOT

SOURCES = sorted(
    [
        *ROOT.glob("fusionvae/**/*.py"),
        *ROOT.glob("datamodules/*.py"),
        *ROOT.glob("scripts/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        ROOT / "train.py",
        ROOT / "evaluate.py",
    ]
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 300, f"{path.name} has {len(text.splitlines())} lines (limit 300): split it"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}:{node.lineno} {node.name}() has {length} lines (limit 60)"


def test_fusionvae_top_level_holds_the_base_and_the_wings():
    """A floor plan (docs/design.md, "Code"): the base modules and four wings, not a flat folder."""
    top = sorted(p.name for p in (ROOT / "fusionvae").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file())
    assert top == ["__init__.py", "errors.py", "evaluation", "files.py", "jobs", "model", "settings.py", "training"]
