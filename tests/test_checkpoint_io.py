import errno
import io
import os

import pytest
import torch

from iq_lightning import checkpoint_io
from iq_lightning.checkpoint_io import StreamingCheckpointIO, save_streamed


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    # Odd sizes: records that straddle chunk boundaries and a tail that is no whole 4 KiB block.
    return {
        "state_dict": {"w": torch.randn(1000, 333, generator=g), "b": torch.randn(7, generator=g)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(12345, generator=g), "step": torch.tensor(3.0)}}}],
        "epoch": 2,
        "text": "é" * 5,
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("chunk", [64 << 20, 1 << 16])  # one chunk; many chunks, records split across them
def test_streamed_file_is_byte_for_byte_what_torch_save_writes(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(checkpoint_io, "WRITE_BUFFER_BYTES", chunk)
    state = _state()
    save_streamed(state, tmp_path / "streamed.ckpt")
    plain = io.BytesIO()
    torch.save(state, plain)  # a file object, as Lightning gives it: the same archive name inside
    streamed, plain = (tmp_path / "streamed.ckpt").read_bytes(), plain.getvalue()
    assert len(streamed) % 4096 != 0  # the padding of the last O_DIRECT block was cut off
    assert streamed == plain
    assert _same(torch.load(tmp_path / "streamed.ckpt", weights_only=False), state)


def test_falls_back_to_buffered_writes_where_o_direct_is_refused(tmp_path, monkeypatch):
    real_open, flags_seen = os.open, []

    def no_direct(path, flags, *args):
        flags_seen.append(flags)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *args)

    monkeypatch.setattr(checkpoint_io.os, "open", no_direct)
    state = _state(1)
    save_streamed(state, tmp_path / "x.ckpt")
    assert [bool(f & os.O_DIRECT) for f in flags_seen] == [True, False]
    assert _same(torch.load(tmp_path / "x.ckpt", weights_only=False), state)


def test_a_full_disk_is_an_oserror_and_nothing_is_left_open(tmp_path, monkeypatch):
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io, "WRITE_BUFFER_BYTES", 1 << 16)
    monkeypatch.setattr(checkpoint_io.os, "write", full)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as info:
        save_streamed(_state(), tmp_path / "x.ckpt")
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(checkpoint_io.os, "write", real_write)
    assert len(os.listdir("/proc/self/fd")) == before


def test_checkpoint_io_round_trip_and_refuses_storage_options(tmp_path):
    plugin = StreamingCheckpointIO()
    state = _state(2)
    plugin.save_checkpoint(state, tmp_path / "sub" / "x.ckpt")
    assert _same(plugin.load_checkpoint(tmp_path / "sub" / "x.ckpt", weights_only=False), state)
    with pytest.raises(TypeError):
        plugin.save_checkpoint(state, tmp_path / "y.ckpt", storage_options={"a": 1})
