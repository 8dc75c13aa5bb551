"""How engine requests fail: busy, unknown model, a request's own bug, or a dead device."""

from __future__ import annotations

import torch

from ..errors import VLMError


class EngineBusy(VLMError):
    """More requests wait than the engine allows: the caller should try again later (HTTP 503)."""


class EngineFailed(RuntimeError):
    """The engine hit an error it cannot recover from (a CUDA error that leaves the device
    unusable, or a bug in the engine's own scheduling); every request after it fails with this."""


class ModelNotFound(VLMError):
    """A request names a model this engine does not serve (HTTP 404)."""


class RequestFailed(RuntimeError):
    """One request met an unexpected error (a bug, not bad input): it fails alone, with its
    traceback in the server's log, and the engine goes on with the others."""


def is_device_fault(error: BaseException) -> bool:
    """Whether `error` leaves the accelerator unusable (a CUDA device-side assert, an illegal
    memory access): every later kernel fails too, so the engine must stop rather than go on."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)
