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
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

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
    if (target / COMPLETE).exists():
        return target
    tmp = root / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir(parents=True)
        log.info("converting %s once into %s (later runs load it in under a second)", gguf.name, target)
        convert(tmp)
        (tmp / COMPLETE).write_text(str(gguf.resolve()))
        if target.exists() and not (target / COMPLETE).exists():
            shutil.rmtree(target, ignore_errors=True)  # not ours and incomplete: copied in by hand?
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / COMPLETE).exists():  # not another process's complete copy
                raise
    except OSError as exc:
        log.warning("cannot keep the converted %s in %s (%s): loading the GGUF file itself", gguf.name, root, exc.strerror or exc)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
