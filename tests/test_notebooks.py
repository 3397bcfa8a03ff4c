"""Both notebooks run headless (nbclient) on a tiny training run and a tiny evaluation, found the
way a user's would be (the newest under the working directory), and say clearly when there is
none. Needs the notebooks extra: pip install -e '.[notebooks]'."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed: pip install -e '.[notebooks]'")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

RUN = Path("outputs/2026-11-23/10-00-00")
EVAL_NAME = "tiny"


def _run(cwd: Path, script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A working directory holding one tiny run and one tiny evaluation of it, as a user's would
    after `python train.py ...` and `python evaluate.py ...` (alone in its parent, so the
    notebooks' search finds nothing else)."""
    root = tmp_path_factory.mktemp("notebooks") / "project"
    root.mkdir()
    _run(root, "train.py", "model=tiny", "epochs=2", "samples_per_epoch=4", "micro_batch_size=2", "sampler.max_new_tokens=8",
         "val.every_n_epochs=0", "beta=0.25", "alpha=1.3", "logger=csv", f"hydra.run.dir={RUN}")
    _run(root, "evaluate.py", "model=tiny", "data.limit=4", "sampler.max_new_tokens=8", "elo.permutations=20", "elo.bootstrap=10",
         "judge_check.matches=4", "judge_check.controls=4", "credit_maps=1", "logger=none", f"name={EVAL_NAME}",
         f"+contestants.iq.run_dir='{RUN}'")
    return root


def _execute(name: str, cwd: Path, extra: str | None = None):
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    if extra:
        nb.cells.append(nbformat.v4.new_code_cell(extra))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _outputs(nb, kind: str) -> list[str]:
    return [str(o.get("data", {}).get(kind, "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def _text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


CHECK_FIGURE = """
for ax in fig.axes:  # the metrics figure of the notebook's second cell
    assert ax.get_ylabel() and ax.get_xlabel() == 'epoch', ax.get_title()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
print('FIGURE OK', len(fig.axes))
"""


def test_run_notebook_finds_the_newest_run_and_uses_its_settings(project):
    nb = _execute("inspect_run", project, extra=CHECK_FIGURE)
    text = _text(nb)
    assert f"run {project / RUN}" in text and "alpha=1.3 beta=0.25" in text
    assert "FIGURE OK 4" in text  # every panel labelled, whole epochs on the x axis
    assert _outputs(nb, "image/png")  # the metrics figure
    page = _outputs(nb, "text/html")[-1]
    assert "alpha = 1.3, beta = 0.25" in page and "fixed for this run" in page  # the run's beta, not 1.0


def test_evaluation_notebook_finds_the_newest_evaluation(project):
    nb = _execute("inspect_evaluation", project)
    text = _text(nb)
    assert str(project / "outputs" / "evaluate" / EVAL_NAME) in text
    assert "contestants: ['iq', 'prompting', 'sft']" in text
    assert len(_outputs(nb, "image/png")) >= 2 and _outputs(nb, "text/markdown")  # plots, summary
    assert any("Token credit" in page for page in _outputs(nb, "text/html"))


@pytest.mark.parametrize(("name", "message"), [("inspect_run", "no training run under"), ("inspect_evaluation", "no evaluation (a directory with results/summary.md) under")])
def test_notebooks_say_clearly_when_there_is_nothing_to_inspect(tmp_path, name, message):
    empty = tmp_path / "nothing" / "here"
    empty.mkdir(parents=True)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as caught:
        _execute(name, empty)
    assert message in str(caught.value) and "set " in str(caught.value)
