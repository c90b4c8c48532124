"""Notebooks are figures only: each is valid nbformat-4 JSON whose code cells parse, and none trains a model
through train.py (they read results/ and runs/)."""
import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_for_each_figure_family():
    names = {path.stem for path in NOTEBOOKS}
    assert {"moons", "ccu_attacks", "ddu_histograms", "limits"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_its_code_parses(path):
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    code = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, "a notebook without code"
    for source in code:
        ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
        assert "train.main(" not in source
