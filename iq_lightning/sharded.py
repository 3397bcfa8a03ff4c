"""Full weights of a sharded policy, materialised one piece at a time.

Under DeepSpeed ZeRO-3 or FSDP every rank holds a slice of each parameter. Exporting the policy
or pushing it into an inference engine needs whole tensors, but gathering the whole model at
once would put a full copy on every rank, which is what sharding avoids. So parameters are
gathered in groups, one at a time: one FSDP unit (FSDP1 `FullyShardedDataParallel` or FSDP2
`fully_shard` module), or for ZeRO-3 one module's own parameters.

The gathers are collectives: every rank must run the iteration to its end, in the same order,
even the ranks that throw the tensors away. Which rank keeps or writes them is the caller's
choice.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn

# Path segments that wrappers insert between a model's own module names.
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})

Named = list[tuple[str, torch.Tensor]]


def plain_name(name: str) -> str:
    """`name` as the unwrapped model spells it (FSDP, activation checkpointing and torch.compile
    wrappers removed)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer: its base weight and adapters make one merged weight, so they are
    always gathered together."""
    return hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")


def full_named_parameters(model: nn.Module, device: torch.device | str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter of `model`, whole, named as in the unwrapped model.

    Plain models yield their detached parameters themselves (no copy). Sharded models yield
    detached copies (on `device` if given, else where the gathered tensor was), since the gathered
    storage is freed once its group is done. While an item is being consumed its group is still
    gathered, and a group never splits a LoRA layer: the layer's own `get_delta_weight` works then.
    Every rank must exhaust this iterator (see the module docstring).
    """
    for group, gathered in _gathered_groups(model):
        for name, param in group:
            tensor = param.detach()
            if gathered:
                tensor = tensor.to(device, copy=True) if device is not None else tensor.clone()
            elif device is not None:
                tensor = tensor.to(device)
            yield name, tensor


def _kind(model: nn.Module) -> str:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "deepspeed"
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return "fsdp1"
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        return "fsdp2"
    return "plain"


def load_from_rank0(model: nn.Module, source: nn.Module | None) -> None:
    """The inverse of `full_named_parameters`: fill a sharded `model` with the weights of `source`,
    a whole model of the same structure that only rank 0 holds (None elsewhere), one group at a
    time. So loading a sharded policy or guide never puts a whole copy on any rank but 0.

    ZeRO-3 broadcasts a group's values from rank 0 when it re-partitions (modifier_rank=0); an
    FSDP1 unit writes each rank's shard back from that rank's whole copy, so rank 0's values are
    broadcast first. Buffers are never sharded: every rank gets rank 0's (meta-initialised ones
    hold garbage). Every rank must call this, in step."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if (source is None) != (rank != 0):
        raise ValueError("load_from_rank0: rank 0, and only rank 0, passes the source model")
    wanted = dict(full_named_parameters(source)) if source is not None else {}
    kind = _kind(model)
    with torch.no_grad():
        for group, _ in _gathered_groups(model, writeback=True):
            for name, param in group:
                if rank == 0:
                    param.copy_(wanted[name])
                if kind != "deepspeed":
                    dist.broadcast(param.data, src=0)
        source_buffers = dict(source.named_buffers()) if source is not None else {}
        for name, buffer in model.named_buffers():
            if rank == 0:
                buffer.copy_(source_buffers[plain_name(name)])
            dist.broadcast(buffer, src=0)


def _gathered_groups(model: nn.Module, writeback: bool = False) -> Iterator[tuple[Named, bool]]:
    """(group, gathered): each group's parameters are whole while it is yielded; `gathered` says
    whether they were gathered (their storage is then freed after the yield). With `writeback`,
    what rank 0 writes into a group (ZeRO-3) or what each rank writes (FSDP1) is re-sharded."""
    kind = _kind(model)
    if kind == "plain":
        params = [(plain_name(n), p) for n, p in model.named_parameters()]
        _refuse_foreign_shards(params)
        yield params, False
        return
    if kind == "deepspeed":
        # Every module is a group root (a LoRA layer with all it holds is one group).
        is_root, gather = (lambda m: True), functools.partial(_deepspeed_gather, writeback=writeback)
    elif kind == "fsdp1":
        is_root, gather = _fsdp_unit_test(kind), functools.partial(_fsdp1_gather, writeback=writeback)
    else:
        if writeback:
            raise NotImplementedError("loading weights into FSDP2 modules piecewise is not supported")
        is_root, gather = _fsdp_unit_test(kind), _fsdp2_gather
    # Tied weights appear once, under their first name, as named_parameters gives them. The
    # tensors are kept referenced so that a freed one's id is never reused by a later group's
    # (gathered tensors are new objects; keeping them costs nothing once their storage is freed).
    seen: dict[int, torch.Tensor] = {}
    for prefix, root in _group_roots(model, "", is_root, top=True):
        if not any(id(p) not in seen for _, p in _own_parameters(root, prefix, is_root)):
            continue
        with gather(root, [p for _, p in _own_parameters(root, prefix, is_root)]):
            # Read inside the gather: FSDP registers the unsharded tensors as new objects. A tied
            # weight may appear twice within one group (an FSDP unit holding both modules).
            params = []
            for n, p in _own_parameters(root, prefix, is_root):
                if id(p) not in seen and not getattr(p, "_is_flat_param", False):
                    seen[id(p)] = p
                    params.append((plain_name(n), p))
            _check_whole(params)
            yield params, True


def _group_roots(module: nn.Module, prefix: str, is_root: Callable[[nn.Module], bool], top: bool):
    """(prefix, module) of every group root in pre-order; the model itself is always one."""
    if top or is_root(module):
        yield prefix, module
    if is_lora_layer(module):
        _refuse_units_inside(module, prefix)
        return  # all it holds is gathered with it
    for name, child in module.named_children():
        yield from _group_roots(child, f"{prefix}{name}.", is_root, top=False)


def _own_parameters(module: nn.Module, prefix: str, is_root: Callable[[nn.Module], bool]):
    """Parameters reached from `module` without entering another group root; everything a LoRA
    layer holds belongs to its group."""
    yield from ((prefix + n, p) for n, p in module.named_parameters(recurse=False))
    for name, child in module.named_children():
        if is_lora_layer(module):
            yield from child.named_parameters(prefix=prefix + name)
        elif not is_root(child):
            yield from _own_parameters(child, f"{prefix}{name}.", is_root)


def _fsdp_unit_test(kind: str) -> Callable[[nn.Module], bool]:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    unit = FullyShardedDataParallel if kind == "fsdp1" else FSDPModule
    return lambda m: isinstance(m, unit)


def _deepspeed_gather(root: nn.Module, params: list[nn.Parameter], writeback: bool = False):
    import deepspeed

    # modifier_rank=None: read-only, so nothing is broadcast back into the partitions afterwards;
    # 0: rank 0's values are broadcast and re-partitioned on exit.
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if writeback else None)


def _fsdp1_gather(root: nn.Module, params: list[nn.Parameter], writeback: bool = False):
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(root, FullyShardedDataParallel):
        return contextlib.nullcontext()  # parameters above the outermost unit are not sharded
    # recurse=False: this unit only (nested units are groups of their own). FSDP1 unshards in
    # full precision here even under mixed precision.
    return FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=writeback)


@contextlib.contextmanager
def _fsdp2_gather(root: nn.Module, params: list[nn.Parameter]):
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    # Not recursive: registers this unit's whole parameters on its modules until reshard().
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def _check_whole(params: Named) -> None:
    from torch.distributed.tensor import DTensor

    for name, param in params:
        if isinstance(param, DTensor) or getattr(param, "_is_flat_param", False):
            raise RuntimeError(f"parameter {name} is still sharded after its group was gathered")


def _refuse_foreign_shards(params: Named) -> None:
    """FSDP1 with use_orig_params keeps the original parameters registered, as slices of a flat
    parameter owned by an FSDP unit. If that unit is outside `model`, nothing here can gather it."""
    foreign = [n for n, p in params if getattr(p, "_fsdp_flattened", False)]
    if foreign:
        raise RuntimeError(
            f"{foreign[0]} is sharded by an FSDP unit that wraps this model from outside; "
            "wrap the model itself as an FSDP unit (e.g. auto_wrap_policy including its class)"
        )


def _refuse_units_inside(lora_layer: nn.Module, prefix: str) -> None:
    """A LoRA layer's base weight and adapters are merged together, so no FSDP unit may split them."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for name, m in lora_layer.named_modules():
        if name and isinstance(m, (FullyShardedDataParallel, FSDPModule)):
            raise RuntimeError(
                f"{plain_name(prefix + name)} is an FSDP unit inside a LoRA layer; wrap whole LoRA layers "
                "(or larger blocks) so that a base weight and its adapters are gathered together"
            )


@contextlib.contextmanager
def ready_for_generate(model: nn.Module, gather_whole_up_to: int = 0) -> Iterator[nn.Module]:
    """The module to call `generate` on. Under FSDP1 generate would run the wrapped module past
    the wrapper's forward, leaving the root unit's own weights (embeddings, final norm, LM head)
    sharded: they are gathered for the call, and the wrapped module is returned (settings such
    as its generation_config live there). Inner units still gather in their own forward. FSDP2
    gathers through module hooks, and plain models need nothing.

    ZeRO-3 gathers each module's partitions in a hook around its forward, so generate would
    all-gather the whole model once per generated token. When the whole model takes at most
    `gather_whole_up_to` bytes (the memory plan's headroom; 0: never), it is gathered once
    around the call instead, with DeepSpeed's module hooks removed meanwhile and registered
    again afterwards, as TRL's unwrap_model_for_generation does. Otherwise the hooks gather."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield model.module
        return
    offload = _zero3_offload(model) if gather_whole_up_to > 0 and _kind(model) == "deepspeed" else None
    if offload is not None and whole_bytes(model) <= gather_whole_up_to:
        with _zero3_whole(model, offload):
            yield model
    else:
        yield model


def whole_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters whole (ZeRO-3 partitions counted at their full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())


def _zero3_offload(model: nn.Module):
    """The DeepSpeedZeRoOffload whose hooks gather `model`'s partitions: the training engine's
    (its ZeRO-3 optimizer's parameter_offload) or a frozen guide's inference engine's. The
    engines are not reachable from the module, but every hook closes over its offload object.
    None when no hook does (a DeepSpeed release that registers them otherwise)."""
    import inspect

    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    for hook in model._forward_pre_hooks.values():
        for cell in inspect.unwrap(hook).__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, DeepSpeedZeRoOffload):
                return value
    return None


@contextlib.contextmanager
def _zero3_whole(model: nn.Module, offload) -> Iterator[None]:
    """`model`'s parameters gathered once, the engine's module hooks off meanwhile (TRL's
    remove_hooks / add_hooks): with them on, each module's post-forward hook would release what
    was gathered and the next forward gather it again."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for param in offload.module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            # Registers every module's hooks again (and invalidates the coordinator's trace).
            offload._register_deepspeed_module(offload.module)
