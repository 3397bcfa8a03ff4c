"""The documentation a user reads points only at what the repository carries: the method page,
the experiments' recipes, and the files the README links."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "experiments/README.md", "docs/method.md"]


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if n.endswith((".md", ".py", ".yaml", ".sh", ".ipynb", ".toml"))]


def test_nothing_points_at_a_method_page_outside_the_repository():
    files = [p for p in _tracked_text_files() if p != Path(__file__).resolve()]
    offenders = [str(p.relative_to(REPO)) for p in files if "METHOD.md" in p.read_text(encoding="utf-8")]
    assert offenders == []
    method = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    for equation in ("alpha * log pi_w(v | x_w, y_<t) + (1 - alpha) * log pi_l(v | x, y_<t)",
                     "L(theta) = sum_{i,t} m_t * ( log pi_hat(y_t) - log pi_theta(y_t) )^2",
                     "credit_t = beta * ( log pi_hat(y_t) - log pi_ref(y_t) )"):
        assert equation in method


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    path = REPO / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
    local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link)]
    missing = [link for link in local if link and not (path.parent / link).exists()]
    assert missing == []


def test_the_readme_links_every_recipe_and_documents_the_offline_reader():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    recipes = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "experiments").glob("**/*.sh"))
    assert recipes and [r for r in recipes if f"]({r})" not in readme] == []
    assert "](experiments/README.md)" in readme
    assert "from iq_lightning.tracking import read_offline_run" in readme


def test_train_help_names_the_method_page():
    from iq_lightning.cli import command_line_help_or_error

    doc = ast.get_docstring(ast.parse((REPO / "train.py").read_text(encoding="utf-8")))
    text = command_line_help_or_error(REPO / "conf", "train", doc, ["--help"])
    assert "docs/method.md" in " ".join(text.split())
