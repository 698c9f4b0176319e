"""Which errors mean the device itself failed (not the request): a worker then restarts."""

from __future__ import annotations

import torch

# A CUDA error (an illegal access, an ECC fault, a lost device) poisons the process's context:
# every later call fails too. torch raises AcceleratorError for these (RuntimeError before 2.8).
# Running out of memory is not one of them: the next, smaller pass may fit.
_DEVICE_ERRORS: tuple[type[BaseException], ...] = tuple(
    kind for kind in (getattr(torch, "AcceleratorError", None),) if kind is not None
)


def device_failed(exc: BaseException) -> bool:
    """Whether `exc` leaves the device unusable for this process."""
    if isinstance(exc, _DEVICE_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)
