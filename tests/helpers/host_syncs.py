"""Counting the ops that make the host wait for a GPU, for the fast-path tests.

A test helper, not part of gradtrace: ``HostSyncCounter`` finds ``.item()`` calls,
data-dependent shapes and blocking copies in a training step, attributed to the code that
issued them, so a test can assert that gradtrace's own code issues none.
"""

from __future__ import annotations

import collections
import os
import traceback
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops that make the host wait for the device: reading a value back (.item(), bool(t),
# .tolist()) and ops whose output size depends on the data.
_SYNC_OPS = frozenset(
    {
        _aten._local_scalar_dense,
        _aten.nonzero,
        _aten._unique2,
        _aten.unique_dim,
        _aten.unique_consecutive,
        _aten.masked_select,
        _aten.bincount,
        _aten.equal,
        _aten.is_nonzero,
        _aten.repeat_interleave,
    }
)
_TORCH_DIR = str(Path(torch.__file__).parent) + os.sep
_THIS_FILE = str(Path(__file__))
# torch's own machinery between an op and a dispatch mode: never "where it happened"
_MACHINERY = (
    os.path.join(_TORCH_DIR, "_dynamo", ""),
    os.path.join(_TORCH_DIR, "utils", "_python_dispatch.py"),
    os.path.join(_TORCH_DIR, "_ops.py"),
    os.path.join(_TORCH_DIR, "_compile.py"),
)


def copy_direction(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """``device-to-host copy`` or ``blocking host-to-device copy`` (both wait), else None.

    A copy to the CPU waits for the device; a host-to-device copy with
    ``non_blocking=False`` synchronises the stream after it.
    """
    if func.overloadpacket is _aten._to_copy:
        target = kwargs.get("device")
        if target is None:
            return None
        src, dst = args[0].device.type, torch.device(target).type
        non_blocking = kwargs.get("non_blocking", False)
    elif func.overloadpacket is _aten.copy_:
        src, dst = args[1].device.type, args[0].device.type
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        return None
    if dst == "cpu" and src not in ("cpu", "meta"):
        return "device-to-host copy"
    if src == "cpu" and dst not in ("cpu", "meta") and not non_blocking:
        return "blocking host-to-device copy"
    return None


def _on_device(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type not in ("cpu", "meta")


def _short(path: str) -> str:
    """A source path from its package on (``torch/optim/adam.py``, ``gradtrace/...``)."""
    for marker in ("site-packages" + os.sep, os.sep + "src" + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


class HostSyncCounter(TorchDispatchMode):
    """Count ops that force a device-to-host sync on a GPU, by the Python code that issued them.

    A dispatch mode sees every ATen op, so it also works on the CPU, where nothing waits:
    ``.item()`` and friends (``aten._local_scalar_dense``) and ops with data-dependent output
    sizes (``nonzero``, ``unique``, ``masked_select``, ``bincount``...), copies from an
    accelerator to the CPU and blocking copies to it (only seen on an accelerator: on the CPU
    ``.cpu()`` is not even an op). Each is attributed to
    the innermost stack frame outside torch itself (``path:line (function)``, the path from its
    package on), naming the torch function it happened in, if any. Counting runs only while
    :attr:`active`.

    Caveat: on the CPU some ops check their inputs with ``.item()`` where the CUDA kernel does
    not (``F.one_hot``'s range check), so CPU counts are an upper bound of the GPU's. With
    ``device_only=True`` (for runs on an accelerator) only ops on accelerator tensors count:
    reading a CPU tensor (Adam's step counters) makes nothing wait.

    Args:
        device_only: count only ops whose inputs include an accelerator tensor.
    """

    def __init__(self, device_only: bool = False) -> None:
        super().__init__()
        self.active = False
        self.device_only = device_only
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.active:
            if func.overloadpacket in _SYNC_OPS and (
                not self.device_only or any(_on_device(a) for a in args)
            ):
                self.counts[self._caller(str(func.overloadpacket))] += 1
            elif (copy := copy_direction(func, args, kwargs)) is not None:
                self.counts[self._caller(copy)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _caller(op: str) -> str:
        inside = ""
        for frame in reversed(traceback.extract_stack()[:-2]):
            if frame.filename == _THIS_FILE or frame.filename.startswith(_MACHINERY):
                continue
            if frame.filename.startswith(_TORCH_DIR):
                inside = inside or f" in {_short(frame.filename)} ({frame.name})"
                continue
            return f"{op}{inside} from {_short(frame.filename)}:{frame.lineno} ({frame.name})"
        return f"{op}{inside}"
