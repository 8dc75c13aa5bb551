"""The inference engine that every front door shares (chat, API, `vlm caption`, `vlm eval`).

    from vlm.engine import InferenceEngine, Request, GenerationSettings
    engine = InferenceEngine(model, processor)
    [completion] = engine.generate([Request("<image> What is this?", [image])])   # offline batches
    for piece in engine.submit(Request(...)):                                      # online, streamed
        print(piece, end="")
"""

from .batches import split_on_oom
from .cache import FeatureCache, pixel_digest
from .engine import (
    EngineBusy,
    EngineFailed,
    InferenceEngine,
    ModelNotFound,
    OutOfMemory,
    RequestFailed,
    context_length,
    is_device_fault,
    stop_token_ids,
)
from .request import Completion, GenerationSettings, ImageInput, Request, Stream

__all__ = [
    "Completion",
    "EngineBusy",
    "EngineFailed",
    "FeatureCache",
    "GenerationSettings",
    "ImageInput",
    "InferenceEngine",
    "ModelNotFound",
    "OutOfMemory",
    "Request",
    "RequestFailed",
    "Stream",
    "context_length",
    "is_device_fault",
    "pixel_digest",
    "split_on_oom",
    "stop_token_ids",
]
