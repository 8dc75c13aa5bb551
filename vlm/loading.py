"""`load_pretrained`: one entry point for every checkpoint kind `vlm` reads.

- a `vlm` checkpoint folder (or hub id);
- an official `Blip2ForConditionalGeneration` / `InstructBlipForConditionalGeneration`
  folder or hub id: same weight names as ours, so only the config is translated;
- a LoRA adapter folder written by `vlm train` (peft format; its base is found from
  `adapter_config.json` or from a `config.json` beside it);
- an official `Blip2ForImageTextRetrieval` checkpoint or a `vlm train --recipe stage1` output
  from one: BLIP-2's stage 1, no LLM; loads as `vlm.image_text.ImageTextModel` (ITC/ITM scoring);
- a registered model name (`vlm.registry`); no name: the default, the offline demo.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoTokenizer, BitsAndBytesConfig, GenerationConfig, PreTrainedConfig
from transformers.utils import GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .configuration import VLMConfig
from .errors import VLMError
from .files import ADAPTER_CONFIG, BRIDGE_WEIGHTS
from .image_text import ImageTextModel
from .modeling import VisionLanguageModel
from .novelty import NoveltyDetector
from .processing import QFORMER_TOKENIZER_DIR, VLMProcessor
from .registry import DEFAULT_MODEL, resolve_model

OFFICIAL_TYPES = {"blip-2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration"}
# Checkpoints of BLIP-2's stage 1 (no LLM): official retrieval ones, and ours.
IMAGE_TEXT_ARCHITECTURES = ("Blip2ForImageTextRetrieval", "ImageTextModel")
# Modules kept out of 4/8-bit: BLIP-2 quality depends on a full-precision vision tower and Q-Former.
NOT_QUANTIZED = ["vision_model", "qformer", "query_tokens", "language_projection", "lm_head"]
# safetensors' names of the floating-point dtypes weights are stored in.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """The compute dtype for `device`: bf16 on GPUs with native bf16 (Ampere and newer), fp16 on
    older GPUs (T4, V100: their bf16 is emulated and slow), fp32 on CPU. The one rule for loading,
    training and the recipes."""
    if str(device).startswith("cuda"):
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float16
    return torch.float32


def quantization_config(quantization: str | None, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """A `BitsAndBytesConfig` that quantizes the LLM only (NF4 for 4-bit)."""
    if quantization in (None, "none"):
        return None
    if quantization not in ("4bit", "8bit"):
        raise VLMError(f"--quantization must be one of 4bit, 8bit, none; got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise VLMError(f"--quantization {quantization} needs bitsandbytes: pip install 'vlm[quant]'")
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=NOT_QUANTIZED,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED)


def read_config_dict(name_or_path: str) -> dict:
    """config.json of a folder or hub id, with a one-line error when it cannot be had."""
    if os.path.isdir(name_or_path):
        path = Path(name_or_path) / "config.json"
        if not path.is_file():
            raise VLMError(f"{name_or_path}: folder has no config.json (not a model checkpoint)")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise VLMError(f"{path}: not valid JSON ({e})") from None
    if os.path.exists(name_or_path):
        raise VLMError(f"{name_or_path}: expected a checkpoint folder, got a file")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise VLMError(f"{name_or_path}: no such folder")
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(name_or_path)
    except OSError as e:
        raise VLMError(
            f"{name_or_path}: not a local folder, and the hub could not be reached or has no such model "
            f"(nothing cached; set HF_HUB_OFFLINE=1 to use only the cache). {str(e).splitlines()[0]}"
        ) from None
    return config_dict


def vlm_config_from_official(config_dict: dict) -> VLMConfig:
    """Translate an official BLIP-2 / InstructBLIP config to a `VLMConfig` (weights map 1:1)."""
    model_type = config_dict["model_type"]
    vision = dict(config_dict.get("vision_config") or {})
    qformer = dict(config_dict.get("qformer_config") or {})
    vision.setdefault("model_type", "blip_2_vision_model" if model_type == "blip-2" else "instructblip_vision_model")
    qformer.setdefault("model_type", "blip_2_qformer" if model_type == "blip-2" else "instructblip_qformer")
    retrieval = is_image_text(config_dict)
    # A retrieval checkpoint has no LLM; its config may still describe BLIP-2's default one.
    text = dict(config_dict.get("text_config") or {"model_type": "opt"})
    if text.get("is_encoder_decoder") or text.get("model_type") in ("t5", "mt5", "umt5"):
        raise VLMError(
            f"{config_dict.get('_name_or_path', 'checkpoint')}: encoder-decoder LLMs (FlanT5) are not supported; "
            "use an OPT/Vicuna/Llama-based checkpoint"
        )
    return VLMConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=config_dict.get("num_query_tokens", 32),
        image_token_index=config_dict.get("image_token_index", config_dict.get("image_token_id")),
        image_text_hidden_size=config_dict.get("image_text_hidden_size", 256) if retrieval else None,
        architectures=["ImageTextModel"] if retrieval else None,
    )


def is_image_text(config_dict: dict) -> bool:
    """Whether a checkpoint's config is a stage-1 (image-text, no LLM) model."""
    return bool(set(config_dict.get("architectures") or []) & set(IMAGE_TEXT_ARCHITECTURES))


def load_processor(name_or_path: str, config: VLMConfig, model_type: str) -> VLMProcessor:
    """Our processor for a `vlm` folder, or built from an official checkpoint's parts."""
    if model_type == VLMConfig.model_type:
        return VLMProcessor.from_pretrained(name_or_path)
    processor = VLMProcessor(
        AutoImageProcessor.from_pretrained(name_or_path),
        AutoTokenizer.from_pretrained(name_or_path),
        num_query_tokens=config.num_query_tokens,
    )
    if config.qformer_reads_instruction:
        processor.qformer_tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder=QFORMER_TOKENIZER_DIR)
    if config.architectures == ["ImageTextModel"]:
        # An official retrieval checkpoint's tokenizer is the Q-Former's (BERT): it reads the texts.
        processor.qformer_tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        return processor
    if processor.image_token_id != config.image_token_index:
        raise VLMError(
            f"{name_or_path}: tokenizer's {processor.image_token} id {processor.image_token_id} differs from "
            f"config image_token_index {config.image_token_index}"
        )
    return processor


def load_pretrained(
    name_or_path: str | None = None,
    quantization: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[VisionLanguageModel | ImageTextModel, VLMProcessor]:
    """Load `(model, processor)` from any checkpoint kind `vlm` reads (see module doc).

    Args:
        name_or_path: folder, hub id, or a registered model name (`vlm.registry`); `None` for
            the default, the offline demo (`"vlm-demo"`).
        quantization: `"4bit"` (NF4) or `"8bit"` quantizes the LLM only; `None` or `"none"` for none.
        device: `"cuda"`, `"cuda:1"`, `"cpu"`...; defaults to CUDA when available.
        dtype: defaults to bf16 on a GPU that supports it, fp32 on CPU. With fp16 the Q-Former
            and query tokens stay fp32 (transformers' `_keep_in_fp32_modules`, as BLIP-2 does);
            with bf16 they load in bf16 like the rest.
    """
    name_or_path = resolve_model(DEFAULT_MODEL if name_or_path is None else str(name_or_path))
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)

    adapter_dir = None
    if os.path.isfile(os.path.join(name_or_path, ADAPTER_CONFIG)):
        adapter_dir, name_or_path = name_or_path, resolve_model(adapter_base(name_or_path))
    config, model_type = read_vlm_config(name_or_path)
    cls = model_class(config)
    if cls is ImageTextModel and quantization not in (None, "none"):
        raise VLMError(f"{name_or_path}: a stage-1 (image-text) model has no LLM to quantize; drop --quantization")
    model = _load_weights(name_or_path, config, quantization, device, dtype, cls)
    processor = load_processor(name_or_path, config, model_type)
    if adapter_dir is not None:
        model = apply_adapter(model, adapter_dir)
        for adapter in model.peft_config.values():  # what a save (a second training stage) records
            adapter.base_model_name_or_path = name_or_path
        processor = adapter_processor(adapter_dir, processor)
    # The training images' statistics, for warnings on images unlike them (`vlm.novelty`).
    folders = [f for f in (adapter_dir, name_or_path) if f is not None and os.path.isdir(f)]
    model.novelty = next((d for d in (load_novelty(f, model.device) for f in folders) if d is not None), None)
    model.eval()
    return model, processor


def adapter_processor(adapter_dir: str | os.PathLike, default: VLMProcessor) -> VLMProcessor:
    """The processor a LoRA output was trained with (its prompt format), else `default` (the base's)."""
    if os.path.isfile(os.path.join(adapter_dir, "processor_config.json")):
        return VLMProcessor.from_pretrained(adapter_dir)
    return default


def load_novelty(folder: str | os.PathLike, device) -> NoveltyDetector | None:
    """The novelty statistics saved in `folder`, on `device` (None when it has none)."""
    detector = NoveltyDetector.load(folder)
    return detector.to(device) if detector is not None else None


def read_vlm_config(name_or_path: str) -> tuple[VLMConfig, str]:
    """`(VLMConfig, model_type)` of a `vlm` or official BLIP-2/InstructBLIP checkpoint."""
    config_dict = read_config_dict(name_or_path)
    model_type = config_dict.get("model_type")
    if model_type not in (VLMConfig.model_type, *OFFICIAL_TYPES):
        raise VLMError(
            f"{name_or_path}: unsupported architecture {model_type!r} "
            f"(vlm loads 'vlm', {', '.join(repr(t) for t in OFFICIAL_TYPES)} checkpoints and LoRA adapters)"
        )
    try:
        if model_type == VLMConfig.model_type:
            return VLMConfig.from_pretrained(name_or_path), model_type
        return vlm_config_from_official(config_dict), model_type
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        reason = " ".join(str(e).split())
        raise VLMError(f"{name_or_path}: bad config.json: {reason}") from None


def model_class(config: VLMConfig) -> type:
    """`ImageTextModel` for stage-1 checkpoints (no LLM), else `VisionLanguageModel`."""
    return ImageTextModel if config.architectures == ["ImageTextModel"] else VisionLanguageModel


def _load_weights(name_or_path: str, config: VLMConfig, quantization: str | None, device: str, dtype: torch.dtype,
                  cls: type = VisionLanguageModel):
    """`cls.from_pretrained` in `dtype` on `device`, the LLM quantized if asked."""
    load_kwargs = {"config": config, "dtype": dtype}
    qconfig = quantization_config(quantization, dtype)
    if qconfig is not None:
        load_kwargs["quantization_config"] = qconfig
    if str(device).startswith("cuda") or qconfig is not None:
        load_kwargs["device_map"] = {"": device}
    try:
        with contextlib.ExitStack() as files:
            state_dict = read_weights(name_or_path, dtype, files, mapped_ok=qconfig is None and device == "cpu")
            if state_dict is None:  # transformers reads (maps) the checkpoint itself
                model = cls.from_pretrained(name_or_path, **load_kwargs)
            else:
                model = _from_state_dict(cls, name_or_path, state_dict, load_kwargs)
    except OSError as e:
        raise VLMError(f"{name_or_path}: cannot load weights ({str(e).splitlines()[0]})") from None
    if "device_map" not in load_kwargs:
        model.to(device)
    return model


def weight_files(folder: str) -> list[str]:
    """The safetensors weight files of a local checkpoint folder (one, or the shards its index names); []
    for anything else."""
    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if not os.path.isfile(index):
        return []
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(folder, shard) for shard in shards]


def read_weights(folder: str, dtype: torch.dtype, files: contextlib.ExitStack, mapped_ok: bool) -> dict | None:
    """Lazy tensors of a local folder's safetensors weights, read with `pread` rather than mapped into
    memory; None where transformers' own reading is as good (or the folder has no safetensors weights).

    transformers maps safetensors files on Linux (it reads them with pread on Windows and MPS): every
    mapped page it reads stays resident until the file is closed, after the whole model has loaded.
    Where the weights are used as stored (`mapped_ok`: on the CPU, not quantized, stored in `dtype`)
    the mapped pages are the weights themselves, nothing is copied, and mapping is best. Otherwise
    each weight is converted (to `dtype`, to 4 bits, to a GPU) and the mapped file is a second copy:
    loading an fp32 checkpoint in bf16 peaked at the fp32 file plus the bf16 weights, above loading
    it in fp32 (measured: a 172 MB checkpoint, 821 MB peak RSS in bf16 against 788 MB in fp32; read
    with pread, 774 MB). Read with pread, each tensor is converted as it arrives: the peak holds the
    converted weights and one tensor on the way. `files` closes the files once loading is done.
    """
    paths = weight_files(folder) if os.path.isdir(folder) else []
    if not paths:
        return None
    handles = [files.enter_context(safe_open(path, framework="pt", device="cpu", backend="pread")) for path in paths]
    if mapped_ok and all(_stored_as(handle, dtype) for handle in handles):
        return None
    return {key: handle.get_slice(key) for handle in handles for key in handle.keys()}


def _stored_as(handle, dtype: torch.dtype) -> bool:
    """Whether every floating-point tensor of an open safetensors file is stored in `dtype`."""
    stored = {handle.get_slice(key).get_dtype() for key in handle.keys()}
    return all(FLOAT_DTYPES.get(name, dtype) == dtype for name in stored)


def _from_state_dict(cls: type, folder: str, state_dict: dict, load_kwargs: dict):
    """`cls.from_pretrained` from `state_dict` (`read_weights`), with what transformers reads from the folder
    besides the weights: the generation defaults, and the folder's name (peft records it as an adapter's base)."""
    if cls.can_generate():
        load_kwargs = {**load_kwargs, "generation_config": _generation_config(folder)}
    model = cls.from_pretrained(None, state_dict=state_dict, **load_kwargs)
    model.config.name_or_path = model.name_or_path = folder
    return model


def _generation_config(folder: str) -> GenerationConfig:
    """The folder's generation_config.json, or (as transformers does without one) the defaults its config.json sets."""
    if os.path.isfile(os.path.join(folder, GENERATION_CONFIG_NAME)):
        return GenerationConfig.from_pretrained(folder)
    return GenerationConfig.from_pretrained(folder, config_file_name="config.json", _from_model_config=True)


def is_peft(model) -> bool:
    """True for a model wrapped by peft (a LoRA adapter on it, unmerged)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def model_folder(name_or_path: str) -> str:
    """Where a checkpoint's `config.json` is: an adapter folder's base, else the folder itself."""
    if os.path.isfile(os.path.join(name_or_path, ADAPTER_CONFIG)):
        return resolve_model(adapter_base(name_or_path))
    return name_or_path


def adapter_base(adapter_dir: str) -> str:
    """The base checkpoint of an adapter folder: a config.json beside it wins over peft's record,
    and a relative record names a folder inside the adapter's (the demo keeps its base there)."""
    if os.path.isfile(os.path.join(adapter_dir, "config.json")):
        return adapter_dir
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise VLMError(f"{path}: not valid JSON ({e})") from None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not base:
        raise VLMError(f"{path}: names no base_model_name_or_path")
    inside = os.path.join(adapter_dir, base)
    return inside if not os.path.isabs(base) and os.path.isdir(inside) else base


def read_bridge(model, folder: str | os.PathLike, model_name: str = "model") -> dict[str, torch.Tensor] | None:
    """A folder's trained bridge (`bridge.safetensors`) checked against `model` and cast to the
    device and dtype of each weight it replaces (a model may span devices); None when the folder
    has none. A weight for a module `model` lacks, or of another shape, is a VLMError naming the
    file (`model_name` says what the model is, for that message)."""
    from safetensors.torch import load_file

    bridge = os.path.join(folder, BRIDGE_WEIGHTS)
    if not os.path.isfile(bridge):
        return None
    known = model.state_dict()
    state = load_file(bridge, device=str(next(model.parameters()).device))
    unknown = sorted(k for k in state if k not in known)
    if unknown:
        raise VLMError(f"{bridge}: weights for modules the {model_name} lacks: {unknown[:3]}")
    wrong = [k for k, v in state.items() if v.shape != known[k].shape]
    if wrong:
        raise VLMError(
            f"{bridge}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
            f"the {model_name} expects {tuple(known[wrong[0]].shape)}"
        )
    return {k: v.to(known[k].device, known[k].dtype) for k, v in state.items()}


def apply_adapter(model: VisionLanguageModel, folder: str | os.PathLike, model_name: str = "model"):
    """Load a folder's trained bridge (`bridge.safetensors`, if any) and peft adapter (if any) onto `model`.

    The bridge is checked first (`read_bridge`). Returns a `PeftModel` when the folder holds
    `adapter_config.json`, else `model` itself.
    """
    bridge = read_bridge(model, folder, model_name)
    if bridge is not None:
        model.load_state_dict(bridge, strict=False)
    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder))
