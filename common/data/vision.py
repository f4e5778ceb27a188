"""torchvision made importable next to the torch that is installed: :func:`ensure_torchvision` runs before
the project's every ``import torchvision``.

PyPI's Linux torchvision 0.28.0 is a CUDA build, which ``make`` installs where PyTorch's CPU index (and
its ``+cpu`` torchvision) does not answer. Next to the project's CPU torch 2.13.0 its C extension does
not load, and ``import torchvision`` then fails with ``operator torchvision::nms does not exist``
(pytorch/vision#9077): its fake-tensor registrations for the two detection ops ``nms`` and ``qnms``
need the ops' schemas, which only the extension declares. Declaring those two schemas with
:mod:`torch.library` first lets the import finish; datasets, transforms and models need no compiled
op, and only the detection ops stay unusable (calling one raises). Where torchvision imports cleanly
(its ``+cpu`` build, a Raspberry Pi's aarch64 wheel, a CUDA machine) nothing is declared.

The import stays lazy: the ClientApp on a device reads prepared partition files and never imports
torchvision, so a Pi does not need it installed.
"""

from __future__ import annotations

import functools

import torch

# As torchvision's C extension declares them (their text is in its _C.so); both take the same arguments.
_OP_SCHEMAS = {op: "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor" for op in ("nms", "qnms")}


@functools.cache
def ensure_torchvision() -> None:
    """Import torchvision, once; the two op schemas are declared only if the plain import fails for
    their lack, so a later ``import torchvision`` anywhere in the process succeeds."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms does not exist" not in str(exc):
            raise
        for name, schema in _OP_SCHEMAS.items():
            torch.library.define(f"torchvision::{name}", schema)
        import torchvision  # noqa: F401
