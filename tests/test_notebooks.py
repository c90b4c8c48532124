"""Notebooks are figures only: each is valid nbformat-4 JSON whose code cells parse, none trains a model, and each
runs headless (nbclient, kernel python3) on the outputs of the commands its markdown names, here made with a tiny
budget into temporary folders: `scripts/demo.py --tiny`, `scripts/moons_figure.py`, `scripts/limits_figures.py`.
A notebook whose input is missing stops in its first code cell with one line naming the command that makes it."""
import ast
import base64
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The command each notebook's missing-input message names (and its markdown shows).
MAKES_INPUT = {"ccu_attacks": "gen_attack_stats.py --study ccu", "ddu_histograms": "python -m utils.plots.ddu",
               "limits": "python scripts/limits_figures.py", "moons": "python scripts/moons_figure.py",
               "gan_samples": "--method gan"}


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
        for trains in ("train.main(", "train_moons(", "train_toy(", "compute_for_run("):
            assert trains not in source, f"{path.name} computes results ({trains}); notebooks only read them"
    markdown = "".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "markdown")
    assert "SPEC" not in markdown, "users have no SPEC: cite docs/methods.md"
    assert MAKES_INPUT[path.stem] in markdown, "the markdown names the command that makes the notebook's input"


@pytest.fixture(scope="session")
def notebook_inputs(tmp_path_factory):
    """{"NB_RUNS_ROOT", "NB_RESULTS_ROOT", "NB_DATASET"}: the demo's kind of outputs at a seconds-long budget."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo
    import limits_figures
    import moons_figure

    base = tmp_path_factory.mktemp("notebook_inputs")
    runs, results = base / "runs", base / "results"
    demo.main(demo.get_args_parser().parse_args(["--runs-root", str(runs), "--results-root", str(results), "--tiny"]))
    moons_figure.main(moons_figure.get_args_parser().parse_args(
        ["--iterations-scale", "0.005", "--out", str(results / "figures" / "moons_confidence.png")]))
    limits_figures.main(limits_figures.get_args_parser().parse_args(
        ["--models", "NN", "--no-regions", "--n-directions", "4", "--n-alphas", "5",
         "--out", str(results / "figures" / "limits"), "--results-root", str(results),
         "--runs", str(runs / "digits" / "plain-s0"), "--image-directions", "4", "--device", "cpu"]))
    return {"NB_RUNS_ROOT": str(runs), "NB_RESULTS_ROOT": str(results), "NB_DATASET": "digits"}


def execute(path: Path, env: dict[str, str]):
    """Run every cell of a notebook in a fresh python3 kernel started from the notebooks folder, with `env`."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(path.parent)}})
    # jupyter_client launches the python3 kernel with sys.executable, i.e. this (virtual-environment) interpreter
    client.execute(env={**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline", "OMP_NUM_THREADS": "1",
                        **env})
    return notebook


def images_of(notebook) -> list[bytes]:
    return [base64.b64decode(output["data"]["image/png"]) for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.get("outputs", []) if output.get("output_type") == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless_on_the_demo_outputs(path, notebook_inputs, tmp_path):
    notebook = execute(path, notebook_inputs)
    images = images_of(notebook)
    assert images and all(image.startswith(b"\x89PNG") for image in images), "every notebook draws figures"
    if os.environ.get("NB_SAVE_FIGURES"):  # to look at them: NB_SAVE_FIGURES=folder pytest tests/test_notebooks.py
        for i, image in enumerate(images):
            Path(os.environ["NB_SAVE_FIGURES"], f"{path.stem}_{i}.png").write_bytes(image)
    text = printed(notebook)
    results = Path(notebook_inputs["NB_RESULTS_ROOT"])
    if path.stem == "ccu_attacks":  # the table the study wrote, then its own numbers: 6 seeds of --tiny
        assert (results / "tables" / "digits_ccu_attack.md").read_text() in text
        assert "6 seeds" in text
    if path.stem == "moons":  # the three models of the saved data, with their validation accuracy
        assert [line.split("|")[1].strip() for line in text.splitlines()[2:5]] == ["plain", "ceda", "acet"]
    if path.stem == "limits":
        assert "toy models: NN\n" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_missing_input_names_the_command_that_makes_it(path, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    empty = {"NB_RUNS_ROOT": str(tmp_path / "runs"), "NB_RESULTS_ROOT": str(tmp_path / "results")}
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
        execute(path, empty)
    message = str(error.value)
    assert "FileNotFoundError" in message and MAKES_INPUT[path.stem] in message
    assert str(tmp_path / "results") in message, "the message names the folder the notebook looked in"
