"""vlm: a BLIP-2-style vision-language assistant (library part).

Public API::

    from vlm import VisionLanguageModel, VLMConfig, VLMProcessor, load_pretrained
    model, processor = load_pretrained(name_or_path, quantization=None, device=None, dtype=None)
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration import VLMConfig
from .errors import VLMError
from .loading import load_pretrained
from .modeling import VisionLanguageModel
from .processing import VLMProcessor

__version__ = "0.1.0"
__all__ = ["VLMConfig", "VLMError", "VLMProcessor", "VisionLanguageModel", "load_pretrained", "__version__"]

# So AutoConfig / AutoModel / AutoModelForImageTextToText / AutoProcessor open `vlm` folders.
AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
AutoModel.register(VLMConfig, VisionLanguageModel, exist_ok=True)
AutoModelForImageTextToText.register(VLMConfig, VisionLanguageModel, exist_ok=True)
AutoProcessor.register(VLMConfig, VLMProcessor, exist_ok=True)
