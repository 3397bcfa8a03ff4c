"""A GGUF model converted once into a plain `save_pretrained` directory, reused by later processes.

Loading SmolLM2's GGUF through transformers takes about 20 s on 2 cores, and only 1.8 s of it is
de-quantisation: the rest is gguf-py parsing the file's metadata in Python, twice for the weights
(config and tensors) and once more for the tokenizer (profiled in benchmarks/README.md). The
converted directory (float32 safetensors, tokenizer files, generation config) loads in well
under a second and holds the same tensors bit for bit (tests/test_gguf.py).

The directory is named by the GGUF file's resolved path, size and modification time and by the
transformers version that converted it; it is written under a temporary name and renamed when
complete, so a killed conversion is never read and two processes converting at once both end
with one complete copy.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from iq_lightning.files import published_directory

log = logging.getLogger(__name__)

# Bump when what a converted directory holds changes: older directories are then ignored.
FORMAT = 1
COMPLETE = "converted.complete"


def cache_key(gguf: Path) -> str:
    import transformers

    stat = gguf.stat()
    identity = f"{FORMAT}|{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def converted(gguf: Path, root: Path, convert: Callable[[Path], None]) -> Path | None:
    """The converted directory of `gguf` under `root`, made with `convert(directory)` on a miss;
    None (the caller loads the GGUF itself) where the cache cannot be written."""
    target = root / f"{gguf.stem}-{cache_key(gguf)}"

    def convert_into(directory: Path) -> None:
        log.info("converting %s once into %s (later runs load it in under a second)", gguf.name, target)
        convert(directory)

    try:
        return published_directory(target, convert_into, COMPLETE)
    except OSError as exc:
        log.warning("cannot keep the converted %s in %s (%s): loading the GGUF file itself", gguf.name, root, exc.strerror or exc)
        return None
