"""`TrainConfig`: the typed training configuration, read from YAML plus `dotted.key=value` overrides.

Every key is checked before anything loads: an unknown key, a wrong type or a bad choice is a
`VLMError` naming the key (and the file), with a suggestion for near-miss spellings.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlm.errors import VLMError

RECIPES = ("align", "bridge", "lora", "qlora", "full")
BRIDGE_MODULES = ("query_tokens", "qformer", "language_projection")


@dataclass
class DataConfig:
    """Where the examples come from (any format `vlm.data.load_examples` reads)."""

    train: str | None = None
    eval: str | None = None
    task: Literal["caption", "vqa", "chat"] | None = None  # None: detected from the data
    image_root: str | None = None
    image_column: str = "image"
    text_column: str = "text"
    skip_bad_images: bool = False
    max_length: int = 512  # text tokens per sample, image tokens included; longer is cut at the end
    # DataLoader workers (images are decoded and tokenized there). auto: 0 when training on CPU,
    # where workers only take cores from the model (measured: 0.78x the throughput on 2 cores
    # with 2 workers), else half the cores, at most 8.
    num_workers: int | Literal["auto"] = "auto"


@dataclass
class LoraSettings:
    """peft LoRA on the LLM only (never the vision tower or the Q-Former)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Leaf module names inside `language_model`, or "auto": every Linear in the LLM's layers
    # (attention and MLP projections), never lm_head.
    target_modules: list[str] | Literal["auto"] = "auto"
    train_bridge: bool = True  # also train Q-Former, queries and projection


@dataclass
class PromptConfig:
    """The prompts used in training; saved with the processor so inference uses the same."""

    caption_prompt: str | None = None  # None: keep the model's own
    question_template: str | None = None  # must hold one "{}" for the question


@dataclass
class TrainConfig:
    """One training run. Field names are the YAML keys; see configs/train/*.yaml."""

    recipe: Literal["align", "bridge", "lora", "qlora", "full"] = "lora"
    model: str | None = None  # vlm/BLIP-2/InstructBLIP folder or hub id; None: the demo default
    output_dir: str = "runs/vlm"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # full recipe: parameter-name prefixes to train, e.g. ["language_model", "qformer"].
    unfreeze: list[str] = field(default_factory=lambda: list(BRIDGE_MODULES))
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8  # per process
    eval_batch_size: int | None = None  # default: batch_size
    grad_accum: int = 1
    warmup: float = 0.03  # < 1: fraction of the steps; >= 1: steps
    lr_scheduler: str = "cosine"  # any transformers SchedulerType, e.g. warmup_stable_decay
    # passed to the scheduler, e.g. {num_decay_steps: 250} for warmup_stable_decay
    lr_scheduler_kwargs: dict = field(default_factory=dict)
    max_grad_norm: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    # CPU memory for caching frozen vision features (each image encoded once; 0 turns it off)
    vision_cache_gb: float = 4.0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = 2
    eval_steps: int = 500
    seed: int = 42
    report_to: list[str] | Literal["auto", "none"] = "auto"  # auto: tensorboard when installed
    # "auto": continue from the newest complete checkpoint in output_dir if any; "none": start
    # fresh; or a checkpoint folder.
    resume: str = "auto"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read `path` (YAML; None for defaults), apply `key.sub=value` overrides, validate.

    Override values are parsed as YAML (`lora.r=8`, `unfreeze=[qformer]`, `prompt.caption_prompt=null`),
    except that a text-valued key keeps its text as given (`prompt.question_template=Q: {}`).
    """
    raw: dict = {}
    where = "config"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise VLMError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise VLMError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise VLMError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise VLMError(f"override {item!r}: expected dotted.key=value")
        key = key.strip()
        _set_dotted(raw, key, _parse_value(value, _field_type(key)))
    return from_dict(raw, where)


def from_dict(raw: dict, where: str = "config") -> TrainConfig:
    """Build a validated `TrainConfig` from nested dicts; errors name `where` and the key."""
    return _build(TrainConfig, raw, where, prefix="")


def _parse_value(text: str, kind=None) -> Any:
    """An override's value, parsed as YAML; for a text-valued key, the text as given.

    YAML reads `Q: {}` as a mapping and `yes` as true; a prompt or path is meant, so when the key
    takes text (`kind` is str/Literal of str, maybe optional) and YAML did not give a string, the
    raw text is kept (`null` still clears an optional key).
    """
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if kind is not None and _takes_text(kind) and not isinstance(value, str):
        if value is None and _allows_none(kind):
            return None
        return text
    return value


def _field_type(dotted: str):
    """The type hint of a dotted TrainConfig key, or None when there is no such key."""
    cls, kind = TrainConfig, None
    for part in dotted.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        kind = hints[part]
        cls = kind if dataclasses.is_dataclass(kind) else None
    return kind


def _arms(kind) -> tuple:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def _takes_text(kind) -> bool:
    """True when every non-None arm of `kind` is str or a Literal of strings."""
    arms = [a for a in _arms(kind) if a is not type(None)]
    return bool(arms) and all(
        a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
        for a in arms
    )


def _allows_none(kind) -> bool:
    return type(None) in _arms(kind)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise VLMError(f"override {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, raw: Any, where: str, prefix: str):
    if not isinstance(raw, dict):
        raise VLMError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else f"; known keys: {', '.join(fields)}"
            raise VLMError(f"{where}: unknown config key '{prefix}{key}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value or {}, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _check(value, kind, where, f"{prefix}{key}")
    return cls(**kwargs)


def _check(value: Any, kind, where: str, key: str) -> Any:
    """`value` converted to `kind` (int -> float allowed), or a VLMError naming `key`."""
    ok, converted = _match(value, kind)
    if not ok:
        raise VLMError(f"{where}: {key} must be {_describe(kind)}, got {value!r}")
    return converted


def _match(value: Any, kind) -> tuple[bool, Any]:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(kind):
            ok, converted = _match(value, arm)
            if ok:
                return True, converted
        return False, None
    if origin is Literal:
        return value in typing.get_args(kind), value
    if origin is list:
        if isinstance(value, str) and typing.get_args(kind)[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]  # "a,b" from the command line
        if not isinstance(value, list):
            return False, None
        item = typing.get_args(kind)[0]
        out = []
        for v in value:
            ok, c = _match(v, item)
            if not ok:
                return False, None
            out.append(c)
        return True, out
    if kind is type(None):
        return value is None, None
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) if value is not None else value
    if kind is str:
        # YAML reads `model: 123` as int; a path or name is still meant.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    return isinstance(value, kind), value


def _describe(kind) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    if origin is list:
        return f"a list of {_describe(typing.get_args(kind)[0])}"
    if kind is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(kind, str(kind))


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
