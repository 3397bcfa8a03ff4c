"""The package keeps its layers and has no import circle, imports made inside functions included:
import-linter checks the contracts written in pyproject.toml ([tool.importlinter])."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `lint-imports`, with this interpreter (import-linter is in the test extra)
LINT_IMPORTS = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the iq_lightning under `root`, with `root`'s pyproject.toml (not the one an
    editable install points at)."""
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [*LINT_IMPORTS, "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )


def test_the_layers_and_acyclic_contracts_are_kept():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "iq_lightning", root / "iq_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_a_circle_made_inside_a_function_breaks_the_contracts(tmp_path):
    # What config.py did before the objectives checked their own options: a function-level import
    # of the objectives, which import config.py.
    root = _copy(tmp_path)
    with (root / "iq_lightning" / "config.py").open("a") as handle:
        handle.write("\n\ndef _objectives():\n    from iq_lightning.objectives import OBJECTIVES\n\n    return OBJECTIVES\n")
    result = _lint_imports(root)
    assert result.returncode == 1, result.stdout[-4000:]
    assert "iq_lightning.config is not allowed to import iq_lightning.objectives" in result.stdout
    assert "No cycles are allowed in iq_lightning" in result.stdout and ".config -> .objectives" in result.stdout


def test_a_module_outside_the_layers_is_refused(tmp_path):
    root = _copy(tmp_path)
    (root / "iq_lightning" / "unplaced.py").write_text("X = 1\n")
    result = _lint_imports(root)
    assert result.returncode == 1, result.stdout[-4000:]
    assert "iq_lightning.unplaced" in result.stdout
