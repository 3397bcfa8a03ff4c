"""numerics=portable: train.py pins the AVX2 kernels before torch loads, records the kernels a run
started with, and gives the same weights as a process started with the pins by hand; the native
kernels of an AVX-512 machine give other weights (why runs did not reproduce across machines)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, compose
from iq_lightning.config import build_run_config
from iq_lightning.errors import ConfigError
from iq_lightning.numerics import PORTABLE_ENV, check

RUN = ["model=tiny", "lr=1e-4", "epochs=1", "samples_per_epoch=4", "micro_batch_size=2", "sampler.max_new_tokens=8",
       "logger=csv", "val.every_n_epochs=0", "credit_maps_per_epoch=0"]


def _train(run_dir: Path, *extra: str, env: dict | None = None) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    environ.update(env or {})
    subprocess.run([sys.executable, "train.py", *RUN, *extra, f"hydra.run.dir={run_dir}"], cwd=REPO, env=environ,
                   check=True, capture_output=True, timeout=600)
    weights = load_file(run_dir / "final" / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(weights[name].float().numpy().tobytes())
    return digest.hexdigest()


def test_portable_pins_the_avx2_kernels_and_matches_a_pinned_process(tmp_path):
    portable = _train(tmp_path / "portable", "numerics=portable")
    recorded = json.loads((tmp_path / "portable" / "numerics.json").read_text())
    assert recorded["cpu_capability"] in ("AVX2", "DEFAULT")
    assert recorded["mkl_cbwr"] in (None, "AVX2")
    by_hand = _train(tmp_path / "by_hand", env=PORTABLE_ENV)
    assert portable == by_hand
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        # This machine's own kernels round differently: the reason a run made here did not
        # reproduce on a machine of another CPU generation.
        assert _train(tmp_path / "native") != portable


def test_portable_asked_for_after_torch_loaded_is_one_line(tmp_path):
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this machine's native kernels are already the portable ones")
    assert "before torch is imported" in check("portable")
    assert check("native") is None
    from iq_lightning.run import train

    with pytest.raises(ConfigError, match="numerics=portable needs its pins"):
        train(build_run_config(compose(RUN + ["numerics=portable"]), tmp_path), show_progress=False)


def test_unknown_numerics_is_refused():
    with pytest.raises(ConfigError, match="numerics must be one of native, portable"):
        build_run_config(compose(RUN + ["numerics=fast"]), "/tmp/unused")
