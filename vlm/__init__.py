"""vlm: a BLIP-2-style vision-language assistant (library part).

Public API::

    from vlm import VisionLanguageModel, VLMConfig, VLMProcessor, load_pretrained
    model, processor = load_pretrained(name_or_path, quantization=None, device=None, dtype=None)

Names are imported on first use, so `vlm --help` and the CLI start without loading torch.
Importing the model or processor registers them with transformers' Auto classes.
"""

import importlib

__version__ = "0.1.0"
_LAZY = {
    "VLMConfig": "vlm.configuration",
    "VisionLanguageModel": "vlm.modeling",
    "VLMProcessor": "vlm.processing",
    "load_pretrained": "vlm.loading",
    "VLMError": "vlm.errors",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlm' has no attribute {name!r}")
