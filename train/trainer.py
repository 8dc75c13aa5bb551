"""The training loop: transformers' `Trainer` with atomic checkpoints of the trainable weights.

What `Trainer` gives as is: mixed precision, gradient accumulation, gradient checkpointing,
warmup + cosine, TensorBoard, periodic evaluation, DDP/FSDP/DeepSpeed through accelerate,
token-count-exact loss scaling across accumulation steps and processes (`num_items_in_batch`).

What we add:
- the loss is the run's recipe's (`Recipe.compute_loss`; `vlm.train.recipes`), the LLM's next-token
  loss unless the recipe has its own; parts it reports (`log_loss_parts`) are logged as `loss_<part>`;
- checkpoints hold `trainable.safetensors` (the bridge and/or LoRA weights; never the frozen
  base), so resuming restores the bridge too, which peft's adapter file would not hold;
- frozen vision features come from a `VisionFeatureCache` when the run has one (`vision_cache.py`);
- the LM head runs only at the positions whose next token carries loss (`logits_to_keep`): with a
  49k-word vocabulary it is ~20% of a small LLM's step, and a caption or short answer is a few
  tokens after a long prompt. The loss is transformers' own (`shift_labels`), so it is the same;
- `Trainer` writes `checkpoint-N` in place, so a kill mid-save leaves a half-written folder that
  `get_last_checkpoint` would pick. We write into `output_dir/.partial/` and `os.replace` the
  finished folder into place (an older folder of the same step is renamed aside first, never
  deleted in place): a `checkpoint-N` folder is always complete.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import os
import re
import shutil

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vlm.errors import VLMError

from .collate import IGNORE_INDEX
from .config import BRIDGE_MODULES, TrainConfig
from .recipes.base import resolve_precision
from .save import (
    STAGING_DIR,
    TRAINABLE_WEIGHTS,
    base_model,
    drop_if_empty,
    load_trainable,
    replace_dir,
    save_trainable,
)
from .vision_cache import VisionFeatureCache

logger = logging.getLogger(__name__)
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class VLMTrainer(Trainer):
    """`Trainer` whose loss is the recipe's and whose checkpoints are the trainable weights, moved into
    place atomically. Without a recipe (`use_recipe`), the loss is the LLM's."""

    _staging = False
    vision_cache: VisionFeatureCache | None = None
    recipe = None  # the run's `vlm.train.recipes.Recipe`

    def use_recipe(self, recipe) -> None:
        """Compute each step's loss with `recipe.compute_loss`."""
        self.recipe = recipe
        self.loss_is_scaled_for_ga = recipe.loss_is_scaled_for_ga
        self._loss_sums: dict[str, float] = {}
        self._loss_count = 0

    def log_loss_parts(self, parts: dict) -> None:
        """Add a training step's named loss parts (tensors or numbers); the next log averages them."""
        for name, value in parts.items():
            self._loss_sums[name] = self._loss_sums.get(name, 0.0) + float(value)
        self._loss_count += 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Trainer's log, plus the recipe's loss parts averaged since the last log (`loss_<part>`)."""
        if getattr(self, "_loss_count", 0) and "loss" in logs:
            for name, total in self._loss_sums.items():
                logs[f"loss_{name}"] = round(total / self._loss_count, 4)
            self._loss_sums, self._loss_count = {}, 0
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """A recipe whose batches carry no `labels` (stage 1's losses need none) still has an
        evaluation loss, which Trainer would skip: it is computed here."""
        if "labels" in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keys = inputs.pop("image_keys", None)  # the collator names each image for the cache
        if self.vision_cache is not None and keys and "pixel_values" in inputs:
            bare = base_model(self.accelerator.unwrap_model(model))
            with self.accelerator.autocast():  # what the model's own forward runs under
                inputs["vision_features"] = self.vision_cache.features(bare, inputs.pop("pixel_values"), keys)
        if self.recipe is not None:
            return self.recipe.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        return self.language_model_loss(model, inputs, return_outputs, num_items_in_batch)

    def language_model_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The LLM's next-token loss on the `labels` (Trainer's own), its LM head run only where a label is."""
        if not return_outputs and "labels" in inputs and self._llm_keeps_logits(model):
            targets = inputs["labels"][:, 1:]  # position t predicts token t + 1
            keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
            inputs["logits_to_keep"] = keep
            inputs["shift_labels"] = targets[:, keep]
        has_image = "pixel_values" in inputs or "vision_features" in inputs
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if has_image or self.args.world_size == 1:
            return result
        # A batch of text-only rows never reaches the bridge; under DDP every process must produce
        # a gradient for every trainable parameter, or the all-reduce waits forever. Zero-weighted.
        loss, outputs = result if return_outputs else (result, None)
        bare = base_model(self.accelerator.unwrap_model(model))
        image_path = ("vision_model", *BRIDGE_MODULES)
        untouched = [p for n, p in bare.named_parameters() if p.requires_grad and n.split(".")[0] in image_path]
        loss = loss + 0.0 * sum(p.sum() for p in untouched)
        return (loss, outputs) if return_outputs else loss

    def _llm_keeps_logits(self, model) -> bool:
        """Whether the LLM's forward takes `logits_to_keep` (Llama, Qwen2, OPT, ... in transformers 5)."""
        if not hasattr(self, "_keeps_logits"):
            llm = base_model(self.accelerator.unwrap_model(model)).language_model
            self._keeps_logits = "logits_to_keep" in inspect.signature(llm.forward).parameters
        return self._keeps_logits

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)  # every rank writes into .partial/checkpoint-N
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            staged = os.path.join(run_dir, STAGING_DIR, name)
            _fsync_tree(staged)
            replace_dir(staged, final)
            drop_if_empty(os.path.join(run_dir, STAGING_DIR))
            rotate_checkpoints(run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_trainable(model, output_dir or self.args.output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable(model if model is not None else self.model, resume_from_checkpoint)


def missing_checkpoint_files(path: str) -> list[str]:
    """What a checkpoint folder lacks of what `VLMTrainer` writes; [] when complete.

    The trainable weights and trainer_state.json always; the optimizer and scheduler state
    where the Trainer writes them as files (plain/DDP: optimizer.pt + scheduler.pt; FSDP:
    optimizer*; DeepSpeed writes its own `latest` + global_step folder instead).
    """
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    missing = [f for f in (TRAINABLE_WEIGHTS, TRAINER_STATE_NAME) if f not in names]
    if "latest" in names:  # DeepSpeed: optimizer and scheduler live in its global_step folder
        return missing
    if not any(n == OPTIMIZER_NAME or n.startswith("optimizer") for n in names):
        missing.append(OPTIMIZER_NAME)
    if SCHEDULER_NAME not in names:
        missing.append(SCHEDULER_NAME)
    return missing


def find_resume_checkpoint(output_dir: str, resume: str) -> str | None:
    """The checkpoint to resume from: `resume` as a folder, the newest complete one for "auto", or None."""
    if resume == "none":
        return None
    if resume != "auto":
        if not os.path.isfile(os.path.join(resume, TRAINABLE_WEIGHTS)):
            raise VLMError(f"resume: {resume} is not a vlm training checkpoint (no {TRAINABLE_WEIGHTS})")
        missing = missing_checkpoint_files(resume)
        if missing:
            raise VLMError(f"resume: {resume} is an incomplete checkpoint (no {', '.join(missing)})")
        return resume
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for entry in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(entry)
        path = os.path.join(output_dir, entry)
        # Completeness check too, for folders that an older tool wrote in place.
        if match and not missing_checkpoint_files(path):
            steps.append((int(match.group(1)), path))
    return max(steps)[1] if steps else None


def training_arguments(config: TrainConfig, has_eval: bool) -> TrainingArguments:
    """`TrainingArguments` for `config` (precision resolved, TensorBoard when installed)."""
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    precision = resolve_precision(config.precision, cuda)
    kwargs = dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler,
        lr_scheduler_kwargs=config.lr_scheduler_kwargs,
        warmup_steps=config.warmup,
        max_grad_norm=config.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps if has_eval else None,
        seed=config.seed,
        data_seed=config.seed,
        report_to=_report_to(config.report_to),
        dataloader_num_workers=_num_workers(config.data.num_workers, cuda),
        # Not persistent: a resumed run then draws worker seeds from the RNG at the same points
        # as an uninterrupted one, so dropout masks and final weights match exactly.
        dataloader_persistent_workers=False,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,
    )
    return _training_arguments(kwargs, config.training_args)


def _training_arguments(kwargs: dict, extra: dict) -> TrainingArguments:
    """`TrainingArguments(**kwargs)` with the config's `training_args` on top, checked by
    `TrainingArguments` itself; a bad field is a VLMError naming `training_args.<field>`."""
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in extra:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean training_args.{near[0]}?)" if near else ""
            raise VLMError(f"training_args.{key}: not a transformers.TrainingArguments field{hint}")
    try:
        return TrainingArguments(**{**kwargs, **extra})
    except (ValueError, TypeError) as e:
        if not extra:
            raise
        reason = " ".join(str(e).split())
        raise VLMError(f"training_args ({', '.join(extra)}): rejected by TrainingArguments: {reason}") from None


def _num_workers(num_workers: int | str, cuda: bool) -> int:
    if num_workers != "auto":
        return int(num_workers)
    return min(8, max(1, (os.cpu_count() or 2) // 2)) if cuda else 0


def _report_to(report_to) -> list[str] | str:
    if report_to == "none":
        return "none"
    if report_to == "auto":
        from transformers.integrations import is_tensorboard_available

        return ["tensorboard"] if is_tensorboard_available() else "none"
    return list(report_to)


def clean_staging(output_dir: str) -> None:
    """Remove checkpoint folders a killed run left half-written."""
    shutil.rmtree(os.path.join(output_dir, STAGING_DIR), ignore_errors=True)


def _fsync_tree(path: str) -> None:
    """Flush the files to disk before the rename makes them visible (power loss safety)."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
