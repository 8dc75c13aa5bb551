"""`TrainConfig`: the typed training configuration, read from YAML plus `dotted.key=value` overrides.

The schema is a set of pydantic models: pydantic checks every key and type before anything
loads. What we add is the YAML/override reading and one-line errors: an unknown key or a wrong
type is a `VLMError` naming the key (and the file), with a suggestion for near-miss spellings.
`training_args:` passes any `transformers.TrainingArguments` field through (checked by
`TrainingArguments` itself when the run starts, see `trainer.training_arguments`).
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlm.errors import VLMError

from .yaml_text import read_yaml, yaml_error



BRIDGE_MODULES = ("query_tokens", "qformer", "language_projection")


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error; numbers are accepted where text is meant
    # (YAML reads `model: 123` as an int, a name is still meant).
    # strict: no true -> 1 or "8" -> 8 (YAML already typed the values).
    model_config = ConfigDict(extra="forbid", strict=True, coerce_numbers_to_str=True)


class DataConfig(_Section):
    """Where the examples come from (any format `vlm.data.load_examples` reads)."""

    train: str | None = None
    eval: str | None = None
    task: Literal["caption", "vqa", "chat"] | None = None  # None: detected from the data
    image_root: str | None = None
    image_column: str = "image"
    text_column: str = "text"
    skip_bad_images: bool = False
    max_length: int = Field(512, ge=8)  # text tokens per sample, image tokens included; longer is cut at the end
    # DataLoader workers (images are decoded and tokenized there). auto: 0 when training on CPU,
    # where workers only take cores from the model (measured: 0.78x the throughput on 2 cores
    # with 2 workers), else half the cores, at most 8.
    num_workers: int | Literal["auto"] = "auto"


class LoraSettings(_Section):
    """peft LoRA on the LLM only (never the vision tower or the Q-Former)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # Leaf module names inside `language_model`, or "auto": every Linear in the LLM's layers
    # (attention and MLP projections), never lm_head.
    target_modules: list[str] | Literal["auto"] = "auto"
    train_bridge: bool = True  # also train Q-Former, queries and projection


class Stage1Settings(_Section):
    """BLIP-2 stage 1 (`recipe: stage1`): the weight of each objective, and the hard negatives."""

    itc: float = Field(1.0, ge=0.0)
    itm: float = Field(1.0, ge=0.0)
    itg: float = Field(1.0, ge=0.0)
    # "sample": drawn from the ITC similarities (LAVIS); "hardest": the most similar (deterministic)
    hard_negatives: Literal["sample", "hardest"] = "sample"
    # Caption tokens (BERT) per pair: LAVIS's 32; BERT has 512 positions.
    max_text_length: int = Field(32, ge=2, le=512)
    # false (default): the word embeddings (and the ITG decoder tied to them) stay as initialised,
    # e.g. BERT's. Trained, ITG (a language model through that tied decoder) pulls the embeddings of
    # words it cannot yet predict from the image, such as "red" and "blue" in "a ___ circle",
    # together, and ITC then cannot tell those captions apart (measured: README, Fine-tune).
    train_word_embeddings: bool = False
    # The Q-Former's dropout on its hidden states during stage 1 (BERT's hidden_dropout_prob is 0.1);
    # null keeps the checkpoint's. 0 (default): from a fresh Q-Former the image reaches the query
    # outputs as ~1% of them, and dropout's noise, 10x that, made ITC collapse every embedding to one
    # point (measured). The saved config keeps the checkpoint's value for stage 2.
    dropout: float | None = Field(0.0, ge=0.0, lt=1.0)
    # false: only what stage 2 never runs trains (text embeddings, the text-side feed-forward
    # layers, the heads): the ITC/ITM heads are fitted to a finished stage-2 bridge (queries and
    # Q-Former unchanged), so one checkpoint answers and scores. The demo does this last.
    train_query_path: bool = True


class PromptConfig(_Section):
    """The prompts used in training; saved with the processor so inference uses the same."""

    caption_prompt: str | None = None  # None: keep the model's own
    question_template: str | None = None  # must hold one "{}" for the question


class TrainConfig(_Section):
    """One training run. Field names are the YAML keys; see configs/train/*.yaml."""

    recipe: str = "lora"  # a registered recipe (vlm.train.recipes): stage1, align, bridge, lora, qlora, full, ...
    model: str | None = None  # vlm/BLIP-2/InstructBLIP folder or hub id; None: the demo default
    output_dir: str = "runs/vlm"
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    stage1: Stage1Settings = Field(default_factory=Stage1Settings)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    # full recipe: parameter-name prefixes to train, e.g. ["language_model", "qformer"].
    unfreeze: list[str] = Field(default_factory=lambda: list(BRIDGE_MODULES))
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = Field(1.0, gt=0.0)
    learning_rate: float = Field(1e-4, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    batch_size: int = Field(8, ge=1)  # per process
    eval_batch_size: int | None = Field(None, ge=1)  # default: batch_size
    grad_accum: int = Field(1, ge=1)
    warmup: float = Field(0.03, ge=0.0)  # < 1: fraction of the steps; >= 1: steps
    lr_scheduler: str = "cosine"  # any transformers SchedulerType, e.g. warmup_stable_decay
    # passed to the scheduler, e.g. {num_decay_steps: 250} for warmup_stable_decay
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    max_grad_norm: float = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    # CPU memory for caching frozen vision features (each image encoded once; 0 turns it off)
    vision_cache_gb: float = Field(4.0, ge=0.0)
    # also keep the vision features in this folder, for later runs on the same images and tower
    vision_cache_dir: str | None = None
    # Training images whose vision-feature statistics the output records, so that the model warns
    # about images unlike them (vlm.novelty); 0: none.
    novelty_images: int = Field(1024, ge=0)
    # What the model says instead of answering about such an image (the demo, which knows only
    # coloured shapes, says so); null: it answers, and the reply carries the warning.
    novelty_answer: str | None = None
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = 2
    eval_steps: int = Field(500, ge=1)
    seed: int = 42
    report_to: list[str] | Literal["auto", "none"] = "auto"  # auto: tensorboard when installed
    # "auto": continue from the newest complete checkpoint in output_dir if any; "none": start
    # fresh; or a checkpoint folder.
    resume: str = "auto"
    # Any other `transformers.TrainingArguments` field (optim, torch_compile, deepspeed, fsdp,
    # ...); wins over what the keys above set.
    training_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, name: str) -> str:
        from .recipes import recipe_names

        known = recipe_names()
        if name not in known:
            raise ValueError(f"a registered recipe ({', '.join(known)})")
        return name

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        from transformers.trainer_utils import SchedulerType

        known = [kind.value for kind in SchedulerType]
        if name not in known:
            raise ValueError(f"one of {', '.join(known)}")
        return name

    def to_dict(self) -> dict:
        return self.model_dump()


# --------------------------------------------------------------------------------------------
def resolve_config_path(name: str) -> Path:
    """A YAML path, or the file of a shipped preset (`lora`, `demo-easyvqa`, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    from vlm.configs import TRAIN_DIR, names

    preset = TRAIN_DIR / f"{name}.yaml"
    if path.suffix not in (".yaml", ".yml") and "/" not in name and preset.is_file():
        return preset
    raise VLMError(f"{name}: no such config file or shipped preset (presets: {', '.join(names(TRAIN_DIR))})")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read `path` (a YAML file or a preset name; None for defaults), apply `key.sub=value`
    overrides, validate.

    Override values are parsed as YAML (`lora.r=8`, `unfreeze=[qformer]`, `prompt.caption_prompt=null`),
    except that a text-valued key keeps its text as given (`prompt.question_template=Q: {}`).
    """
    raw: dict = {}
    where = "config"
    if path is not None:
        file = resolve_config_path(str(path))
        where = str(path)
        try:
            raw = read_yaml(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise VLMError(yaml_error(str(path), e)) from None
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
    try:
        return TrainConfig.model_validate(_numbers_as_text(with_recipe_defaults(raw)))
    except ValidationError as e:
        raise VLMError(f"{where}: {_describe_error(e, raw)}") from None


def with_recipe_defaults(raw: dict) -> dict:
    """`raw` over the defaults of the recipe it names (`Recipe.defaults`): what the config leaves out,
    the recipe chooses (a stage-1 learning rate for `recipe: stage1` alone)."""
    from .recipes import get_recipe, recipe_names

    name = raw.get("recipe", TrainConfig.model_fields["recipe"].default) if isinstance(raw, dict) else None
    if not isinstance(name, str) or name not in recipe_names():
        return raw  # validation names the problem
    return _merged(get_recipe(name).defaults, raw)


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, section by section."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _numbers_as_text(raw: dict, model: type[BaseModel] = TrainConfig) -> dict:
    """`raw` with numbers at keys that take text turned into text: YAML reads `model: 123` or
    `caption_prompt: 1e-3` as numbers, where a name or a prompt is meant."""
    out = dict(raw)
    for key, value in raw.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        kind = field.annotation if field is not None else None
        if isinstance(value, dict) and isinstance(kind, type) and issubclass(kind, BaseModel):
            out[key] = _numbers_as_text(value, kind)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and kind is not None and _takes_text(kind):
            out[key] = str(value)
    return out


def _describe_error(error: ValidationError, raw: dict) -> str:
    """One line for pydantic's first error: the dotted key, what it must be, what it got."""
    first = error.errors()[0]
    key = _key_of(first["loc"], unknown=first["type"] == "extra_forbidden")
    if first["type"] == "extra_forbidden":
        section, _, name = key.rpartition(".")
        known = _section_fields(section)
        near = difflib.get_close_matches(name, known, n=1)
        prefix = f"{section}." if section else ""
        hint = f" (did you mean {prefix}{near[0]}?)" if near else f"; known keys: {', '.join(known)}"
        return f"unknown config key '{key}'{hint}"
    value = raw
    for part in filter(None, key.split(".")):
        value = value.get(part) if isinstance(value, dict) else None
    if first["type"] in ("model_type", "model_attributes_type", "dict_type") and _field_type(key) is not None \
            and isinstance(_field_type(key), type) and issubclass(_field_type(key), BaseModel):
        return f"{key} must be a mapping, got {value!r}"
    if not key:
        return f"the top level must be a mapping, got {value!r}"
    if first["type"] in CONSTRAINTS:  # the right type, out of range: pydantic's words say how
        rule = first["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
        return f"{key} must be {rule}, got {value!r}"
    return f"{key} must be {_expected(key)}, got {value!r}"


CONSTRAINTS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "value_error"}


def _key_of(loc: tuple, unknown: bool) -> str:
    """The dotted config key of a pydantic error location (which also names union arms and
    list indices: `lora.target_modules.list[str].0`)."""
    model, parts = TrainConfig, []
    for part in loc:
        if model is None or not isinstance(part, str):
            break
        if part not in model.model_fields:
            if unknown:
                parts.append(part)
            break
        parts.append(part)
        kind = model.model_fields[part].annotation
        model = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return ".".join(parts)


def _section_fields(section: str) -> list[str]:
    model: type[BaseModel] = TrainConfig
    for part in filter(None, section.split(".")):
        model = model.model_fields[part].annotation
    return list(model.model_fields)


def _expected(key: str) -> str:
    kind = _field_type(key)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    arms = [a for a in _arms(kind) if a is not type(None)]
    words = []
    for arm in arms:
        if typing.get_origin(arm) is Literal:
            words.append("one of " + ", ".join(repr(v) for v in typing.get_args(arm)))
        elif typing.get_origin(arm) is list:
            item = typing.get_args(arm)[0]
            words.append("a list of " + {str: "strings", int: "integers"}.get(item, str(item)))
        else:
            words.append(names.get(arm, "a mapping" if typing.get_origin(arm) is dict else str(arm)))
    return " or ".join(words) + (" or null" if type(None) in _arms(kind) else "")


def _parse_value(text: str, kind=None) -> Any:
    """An override's value, parsed as YAML; for a text-valued key, the text as given.

    YAML reads `Q: {}` as a mapping and `yes` as true; a prompt or path is meant, so when the key
    takes text (`kind` is str/Literal of str, maybe optional) and YAML did not give a string, the
    raw text is kept (`null` still clears an optional key).
    """
    try:
        value = read_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    if kind is not None and _takes_text(kind) and not isinstance(value, str):
        if value is None and type(None) in _arms(kind):
            return None
        return text
    return value


def _field_type(dotted: str):
    """The type hint of a dotted TrainConfig key, or None when there is no such key."""
    model, kind = TrainConfig, None
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            return None
        kind = model.model_fields[part].annotation
        model = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return kind


def _arms(kind) -> tuple:
    if typing.get_origin(kind) in (typing.Union, getattr(typing, "UnionType", ()), type(int | None)):
        return typing.get_args(kind)
    return (kind,)


def _takes_text(kind) -> bool:
    """True when every non-None arm of `kind` is str or a Literal of strings."""
    arms = [a for a in _arms(kind) if a is not type(None)]
    return bool(arms) and all(
        a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
        for a in arms
    )


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise VLMError(f"override {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
