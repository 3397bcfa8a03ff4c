"""Which CPU kernels a run's floating-point results come from, and how to make them the same on
every x86-64 machine.

A run is bitwise deterministic on one machine (the samples are seeded per prompt, the kernels are
deterministic). Across machines it is not by default: torch picks its vectorised kernels by the
CPU's instruction set (ATen's AVX-512 or AVX2 builds) and MKL picks its matrix-multiply code path
the same way, and the two paths round differently. Measured here (SmolLM2 forward, 4 x 64 tokens):
the logits of the AVX-512 and AVX2 paths differ, and from the first sampled token that differs at
temperature 1 the runs go apart. Thread counts 1 and 2 gave identical logits.

`numerics=portable` pins both (and oneDNN) to their AVX2 paths, so any x86-64 CPU with AVX2 runs
the same kernels. The pins are environment variables read when torch and MKL load, so the entry
point sets them before torch is imported (`pin_portable`); `check` then verifies they took.
"""

from __future__ import annotations

from typing import MutableMapping

MODES = ("native", "portable")

# ATen's kernel dispatch, MKL's conditional numerical reproducibility, oneDNN's ISA ceiling.
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_portable(environ: MutableMapping[str, str]) -> None:
    """Set the AVX2 pins in `environ` (os.environ, before torch is first imported; children that
    Lightning launches for other ranks inherit them)."""
    for key, value in PORTABLE_ENV.items():
        environ[key] = value


def identity() -> dict:
    """What decides this process's CPU results: torch's build, the kernels it dispatched to, the
    thread count. Recorded in the run directory (numerics.json) and compared on resume."""
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": _mkl_cbwr(),
        "threads": torch.get_num_threads(),
    }


def _mkl_cbwr() -> str | None:
    """MKL's code path as MKL itself reports it: the pinned branch, or "auto:<branch>" when MKL
    picks by the CPU (None where it cannot be asked)."""
    import ctypes
    import os

    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:
        # torch links MKL statically into libtorch_cpu, which exports MKL's service functions.
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get, auto = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_get_auto_branch
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes, auto.restype = ctypes.c_int, [ctypes.c_int], ctypes.c_int
    branch = get(1)  # MKL_CBWR_BRANCH
    if branch == 1:  # MKL_CBWR_BRANCH_OFF: dispatched by the CPU
        return "auto:" + _CBWR_NAMES.get(auto(), str(auto()))
    return _CBWR_NAMES.get(branch, str(branch))


# mkl_cbwr.h's branch values.
_CBWR_NAMES = {
    2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX", 10: "AVX2",
    11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1",
}


def check(mode: str) -> str | None:
    """None when the kernels match `mode`; otherwise why not, in one line (portable asked for after
    torch was already imported, e.g. in a notebook or a test process)."""
    if mode != "portable":
        return None
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "DEFAULT") or _mkl_cbwr() not in (None, "AVX2"):
        pins = " ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items())
        return (
            f"numerics=portable needs its pins set before torch is imported, and torch already runs its {capability} "
            f"kernels: start train.py (it sets them), or set {pins} before starting Python"
        )
    return None
