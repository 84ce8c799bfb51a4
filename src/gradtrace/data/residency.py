"""Whether the data module's splits live on the training device (device-resident) or in host
memory, each batch then being copied to the device."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gradtrace.data.image_data import Split

__all__ = ["RESIDENT_SHARE", "split_device"]

# By default the splits go to a CUDA device only if they take at most this share of its free
# memory: the rest is the training's (activations, optimizer state, the compiler's buffers).
RESIDENT_SHARE = 0.5


def split_device(
    splits: Mapping[str, Split] | None, device: torch.device, device_resident: bool | None
) -> tuple[torch.device | None, str | None]:
    """Where ``splits`` should live when training on ``device``, and why not there.

    Returns ``(device or None, reason or None)``. The device is ``device`` when
    ``device_resident`` is true or, when it is ``None``, when ``device`` is a CUDA device on which
    the splits take at most :data:`RESIDENT_SHARE` of the free memory (every rank holds them
    whole on its own GPU); ``None`` means they stay where they were loaded. The reason, a line
    for the log, is given only when the splits stay in host memory for lack of room.
    """
    if device_resident is False:
        return None, None
    if device_resident:
        return device, None
    if device.type != "cuda" or splits is None:
        return None, None
    if splits["train"][0].device == device:
        return device, None  # placed by an earlier setup
    needed = sum(t.nbytes for split in splits.values() for t in split)
    free, _ = torch.cuda.mem_get_info(device)
    if needed <= RESIDENT_SHARE * free:
        return device, None
    return None, (
        f"Data: the splits stay in host memory and each batch is copied to {device}: they take "
        f"{needed / 2**30:.3g} GiB, more than {round(100 * RESIDENT_SHARE)}% of the "
        f"{free / 2**30:.3g} GiB free there (device_resident=true puts them on the GPU anyway)"
    )
