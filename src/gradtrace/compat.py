"""Every private attribute of Lightning, torch and DeepSpeed that gradtrace touches, in one place.

Each function reads one internal that has no public equivalent (the reason is beside it), so
an upgrade that moves one breaks here and in ``tests/test_compat.py``, which pins each against
the installed versions, and nowhere else. A test scans ``src/`` and fails on a private access
anywhere but this module.

Importable with torch alone: Lightning and DeepSpeed are imported inside the functions that
read them, and only ever called with their objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

__all__ = [
    "ATEN_ADAPTIVE_AVG_POOL2D",
    "ATEN_CPU_ATTENTION",
    "CONV_BASE",
    "NORM_BASE",
    "attached_trainer",
    "batches_that_stepped",
    "deepspeed_zero3_group",
    "deepspeed_zero12_fragment",
    "foreach_copy",
    "foreach_norm",
    "foreach_sub_",
    "fsdp1_units",
    "is_compiled_module",
    "is_deepspeed_zero12",
    "is_fsdp1_flattened",
    "lightning_cli_config_value",
    "loss_scale_tensor",
    "optimizer_handles_unscaling",
    "own_children",
    "own_parameters",
    "set_subcommand_option_help",
    "should_update_logs",
    "tree_leaves",
]

# ---------------------------------------------------------------- Lightning


def batches_that_stepped(trainer: Any) -> int:
    """The step Lightning's loggers write at (``global_step`` counts optimizer steps, several
    per batch with several optimizers; this counts batches that stepped)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def should_update_logs(trainer: Any) -> bool:
    """Whether Lightning's loggers write on this batch (its own rule, with ``should_stop``)."""
    return trainer._logger_connector.should_update_logs


def optimizer_handles_unscaling(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales its own gradients under AMP (fused optimizers): then
    ``.grad`` still holds the scaled values in ``on_before_optimizer_step``."""
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    return bool(_optimizer_handles_unscaling(optimizer))


def attached_trainer(module: Any) -> Any:
    """The Trainer ``module`` is attached to, or ``None`` (the public ``trainer`` raises)."""
    return module._trainer


def loss_scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scaler's current scale as a tensor, with no host synchronisation (the public
    ``get_scale`` returns a float)."""
    return scaler._get_scale_async()


def lightning_cli_config_value(cli: Any, config: Any, key: str, default: Any = None) -> Any:
    """``key`` of a LightningCLI config namespace, under the running subcommand if any
    (``LightningCLI._get``: the public ``config`` needs the subcommand spelled out)."""
    return cli._get(config, key, default=default)


def set_subcommand_option_help(cli: Any, option: str, help_by_subcommand: dict[str, str]) -> None:
    """Replace the help text of a LightningCLI subcommand's ``option`` (``ckpt_path``: the
    Trainer method's generic docstring). The subcommand parsers are ``_subcommand_parsers``
    and their options argparse's ``_actions``: neither has a public accessor."""
    for subcommand, text in help_by_subcommand.items():
        parser = cli._subcommand_parsers[subcommand]
        [action] = [a for a in parser._actions if a.dest == option]
        action.help = text


# ---------------------------------------------------------------- torch


def is_fsdp1_flattened(param: torch.Tensor) -> bool:
    """Whether ``param`` is an original parameter of an FSDP1 unit (``use_orig_params=True``):
    a view into the unit's flat parameter, its gradient a shard or ``None``."""
    return bool(getattr(param, "_fsdp_flattened", False))


CONV_BASE: type[nn.Module] = nn.modules.conv._ConvNd
"""The base of every convolution (``Conv1d/2d/3d``, transposed, lazy, timm's ``Conv2dSame``)."""
NORM_BASE: type[nn.Module] = nn.modules.batchnorm._NormBase
"""The base of BatchNorm, SyncBatchNorm and InstanceNorm (with running statistics or not)."""
ATEN_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
"""The fused attention kernel on the CPU, which ``FlopCounterMode`` does not count."""
ATEN_ADAPTIVE_AVG_POOL2D = torch.ops.aten._adaptive_avg_pool2d
"""What ``adaptive_avg_pool2d`` dispatches to when the output is not 1x1."""


def own_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter | None]]:
    """``module``'s own parameters in registration order, repeats included (the public
    ``named_parameters(recurse=False)`` drops a parameter registered twice)."""
    return iter(module._parameters.items())


def own_children(module: nn.Module) -> Iterator[tuple[str, nn.Module | None]]:
    """``module``'s children in registration order, repeats and ``None`` slots included
    (``named_children`` drops both, and with them the names a shared child is known by)."""
    return iter(module._modules.items())


def is_compiled_module(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper (``_orig_mod``) or was compiled in
    place (``module.compile()`` sets ``_compiled_call_impl``)."""
    return "_orig_mod" in module._modules or (
        getattr(module, "_compiled_call_impl", None) is not None
    )


def foreach_norm(
    tensors: Sequence[torch.Tensor], ord: float, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """One norm per tensor in one kernel per (device, dtype) (``torch._foreach_norm``: what
    ``clip_grad_norm_`` batches with; ``torch.linalg.vector_norm`` is one launch a tensor)."""
    if dtype is None:
        return list(torch._foreach_norm(list(tensors), ord))
    return list(torch._foreach_norm(list(tensors), ord, dtype=dtype))


def foreach_copy(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of every tensor, batched (``torch._foreach_mul`` by one)."""
    return list(torch._foreach_mul(list(tensors), 1.0))


def foreach_sub_(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    """``a[i] -= b[i]`` for every ``i``, in place and batched (``torch._foreach_sub_``)."""
    torch._foreach_sub_(list(a), list(b))


def fsdp1_units(module: nn.Module) -> Iterator[tuple[list[nn.Parameter], Any]]:
    """For each FSDP1 unit in ``module`` whose original parameters the optimizer sees
    (``use_orig_params=True``): those parameters and the process group that shards them
    (``None``: ``NO_SHARD``, whole on every rank). FSDP1 gives an original parameter no link
    back to its ``FlatParamHandle``; the handle's sharding strategy and group are private."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp._flat_param import HandleShardingStrategy
    except ImportError:  # torch built without distributed
        return
    for unit in FullyShardedDataParallel.fsdp_modules(module):
        handle = unit._handle
        # No handle: a unit without parameters; no _params: use_orig_params=False, where the
        # original parameters are not the ones the optimizer and grad_stats see.
        if handle is None or handle.flat_param._params is None:
            continue
        sharded = handle._sharding_strategy != HandleShardingStrategy.NO_SHARD
        params = [*handle.flat_param._params, *handle.flat_param._shared_params]
        yield params, handle.process_group if sharded else None


# ---------------------------------------------------------------- DeepSpeed


def deepspeed_zero3_group(param: Any) -> Any:
    """The process group a ZeRO-3 parameter is partitioned over (the one DeepSpeed's own
    full-gradient gather uses)."""
    group = getattr(param, "ds_process_group", None)
    return group if group is not None else param._z3_optimizer.dp_process_group


def is_deepspeed_zero12(param: Any) -> bool:
    """Whether ``param`` is a ZeRO-1/2 parameter (its gradient lives in optimizer partitions)."""
    return hasattr(param, "_hp_mapping")


def deepspeed_zero12_fragment(param: Any) -> tuple[Any, torch.Tensor | None]:
    """ZeRO-1/2: ``param``'s data-parallel group and, flattened, the fragment of its reduced
    gradient in this rank's optimizer partition (``None`` where the partition holds none), as
    DeepSpeed's ``get_full_hp_grad`` reads it before its all_reduce of the whole tensor."""
    mapping = param._hp_mapping
    if mapping is None:
        return param._dp_group, None
    fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).flatten()
    address = mapping.lp_fragment_address
    if fragment.numel() == param.numel():  # a whole-tensor buffer (BF16_Optimizer): as DeepSpeed
        fragment = fragment.narrow(0, address.start, address.numel)
    return param._dp_group, fragment
