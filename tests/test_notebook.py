"""notebooks/walkthrough.ipynb: every code cell runs, in order, in one namespace (as a Jupyter kernel
would run it top to bottom), with matplotlib's Agg backend and a temporary working folder; the saved
file holds no outputs. No nbformat/nbconvert: the .ipynb is plain JSON.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_notebook.py   (CPU, about 10 s)"""

import json
import os

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere: figures are drawn, never shown
import matplotlib.pyplot as plt  # noqa: E402

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "walkthrough.ipynb")


def load():
    with open(NOTEBOOK) as f:
        return json.load(f)


def test_saved_without_outputs():
    nb = load()
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    # every section the notebook promises is there, in order
    heads = [c["source"][0] for c in nb["cells"] if c["cell_type"] == "markdown" and c["source"][0].startswith("## (")]
    assert [h[3:6] for h in heads] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]


def test_every_code_cell_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a cell writes lands here
    code = [c for c in load()["cells"] if c["cell_type"] == "code"]
    ns, ran = {"__name__": "__main__"}, 0
    try:
        for i, cell in enumerate(code):
            exec(compile("".join(cell["source"]), f"walkthrough.ipynb code cell {i}", "exec"), ns)
            ran += 1
    finally:
        plt.close("all")
    assert ran == len(code)
    # the run reached its end: the last section's chains were drawn and judged, every image once
    chains = ns["chains"]
    assert chains and all(len(c.images) == len(c.verdicts) == len(c.reasons) >= 1 for c in chains)
