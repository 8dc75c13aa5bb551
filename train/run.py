"""One training run, start to finish: data, model, Trainer, resume, output folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from transformers import set_seed

from vlm.errors import VLMError

from .config import TrainConfig
from .novelty_stats import record_novelty
from .recipes import recipe_for
from .recipes.base import Recipe, trainable_parameter_count
from .save import TRAIN_CONFIG, base_model, check_output_dir, record_run_files, write_train_config
from .trainer import VLMTrainer, clean_staging, find_resume_checkpoint, training_arguments
from .vision_cache import VisionFeatureCache, cache_blocker, tower_fingerprint

logger = logging.getLogger(__name__)


def load_data(config: TrainConfig, path: str) -> Sequence:
    """Examples from any format `vlm.data.load_examples` reads; empty data is an error."""
    from vlm.data import load_examples

    examples = load_examples(
        path,
        task=config.data.task,
        image_root=config.data.image_root,
        image_column=config.data.image_column,
        text_column=config.data.text_column,
        skip_bad_images=config.data.skip_bad_images,
    )
    if len(examples) == 0:
        raise VLMError(f"{path}: no examples")
    return examples


def train(
    config: TrainConfig,
    train_examples: Sequence | None = None,
    eval_examples: Sequence | None = None,
    callbacks: Sequence | None = None,
) -> Path | None:
    """Train per `config`; returns the output folder (None on non-main processes).

    `train_examples` / `eval_examples` (lists of `vlm.data.Example`) replace `config.data.train`
    / `config.data.eval` when given (library use without files). `callbacks`: extra
    `transformers.TrainerCallback`s (progress reporting, timing).
    """
    recipe = recipe_for(config)
    args = training_arguments(config, has_eval=bool(eval_examples or config.data.eval))
    # Everything that can be wrong with the input fails here, before the model loads.
    train_examples, eval_examples = read_inputs(config, train_examples, eval_examples)
    recipe.check_data(train_examples, eval_examples, args.world_size)
    theirs = check_output_dir(config.output_dir)  # before hours of training, not after
    resume_from = find_resume_checkpoint(config.output_dir, config.resume)
    if resume_from is not None and config.resume == "auto":
        check_same_run(config)

    set_seed(config.seed)  # LoRA init draws from the RNG: same seed, same starting weights
    model, processor = recipe.prepare_model(device=str(args.device))
    trainable, total = trainable_parameter_count(model)
    if args.should_log:
        print(
            f"recipe {config.recipe}: training {trainable:,} of {total:,} parameters on {len(train_examples):,} "
            f"examples" + (f"; resuming from {resume_from}" if resume_from else ""),
            flush=True,
        )
    train_dataset, eval_dataset, collator = recipe.datasets(processor, train_examples, eval_examples,
                                                          processes=args.world_size)
    if args.should_save:
        os.makedirs(config.output_dir, exist_ok=True)
        clean_staging(config.output_dir)
        write_train_config(config, config.output_dir)
    trainer = build_trainer(recipe, args, model, processor, train_dataset, eval_dataset, collator, callbacks)
    result = trainer.train(resume_from_checkpoint=resume_from)
    report(trainer, result, eval_dataset, train_examples)
    out = save_output(trainer, processor, recipe, train_examples)
    if out is not None:
        record_run_files(out, theirs)
    return out


def build_trainer(recipe: Recipe, args, model, processor, train_dataset, eval_dataset, collator,
                  callbacks: Sequence | None) -> VLMTrainer:
    """The `VLMTrainer` of the run: the recipe's loss, and the vision feature cache."""
    trainer = VLMTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=list(callbacks or []),
    )
    trainer.use_recipe(recipe)
    trainer.vision_cache = make_vision_cache(recipe.config, trainer, processor.image_processor)
    return trainer


def report(trainer: VLMTrainer, result, eval_dataset, train_examples: Sequence) -> None:
    """After training: the cache's counts, train_results.json, the evaluation loss, skipped rows."""
    args = trainer.args
    cache = trainer.vision_cache
    if cache is not None and args.should_log:
        print(f"vision features: {cache.misses:,} computed, {cache.hits:,} reused from the cache", flush=True)
    if args.should_save:
        trainer.save_metrics("train", result.metrics)  # train_results.json: runtime, samples/s, loss
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        if args.should_log:
            print(f"eval loss {metrics.get('eval_loss', float('nan')):.4f}", flush=True)
    skipped = getattr(train_examples, "skipped", 0)
    if skipped and args.should_log:
        print(f"skipped {skipped} rows with missing or broken images", flush=True)


def save_output(trainer: VLMTrainer, processor, recipe: Recipe, train_examples: Sequence) -> Path | None:
    """The run's output folder (on the main process; None on the others), with novelty statistics."""
    trainer.accelerator.wait_for_everyone()
    # Under FSDP / DeepSpeed the full weights exist only once gathered, which every process joins.
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not trainer.args.should_save:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    out = recipe.save(model, processor, state_dict)
    config = recipe.config
    if config.novelty_images:
        record_novelty(base_model(model), processor, train_examples, out, config.novelty_images, trainer.vision_cache,
                       answer=config.novelty_answer)
    return out


def read_inputs(config: TrainConfig, train_examples: Sequence | None,
                eval_examples: Sequence | None) -> tuple[Sequence, Sequence | None]:
    """The training and evaluation examples (read from `config.data` unless given)."""
    if train_examples is None:
        if not config.data.train:
            raise VLMError("no training data: give --train-data or data.train in the config")
        train_examples = load_data(config, config.data.train)
    if eval_examples is None and config.data.eval:
        eval_examples = load_data(config, config.data.eval)
    return train_examples, eval_examples


# What makes a run that run: a checkpoint of another one must not be continued unasked.
RUN_IDENTITY = ("recipe", "model", "data", "lora", "stage1", "prompt", "unfreeze")


def check_same_run(config: TrainConfig) -> None:
    """A VLMError when `output_dir`'s checkpoints come from a run with another model, recipe,
    data or adapter settings (`resume: auto` would silently continue that run)."""
    saved = Path(config.output_dir) / TRAIN_CONFIG
    if not saved.is_file():
        return
    from .config import load_config

    before, now = load_config(str(saved)).to_dict(), config.to_dict()
    for settings in (before, now):  # how the data is read, not what it is
        settings["data"].pop("num_workers")
    for key in RUN_IDENTITY:
        if before[key] != now[key]:
            raise VLMError(
                f"{config.output_dir} holds checkpoints of a run with another {key} ({before[key]!r}; now "
                f"{now[key]!r}): continue it with its settings ({saved}), start over with --no-resume, or "
                "choose another --output-dir")


def make_vision_cache(config: TrainConfig, trainer: VLMTrainer, image_processor=None) -> VisionFeatureCache | None:
    """The run's vision feature cache, or None (turned off, or the tower's output can change)."""
    if config.vision_cache_gb == 0:
        return None
    bare = base_model(trainer.model)
    vision_trains = any(p.requires_grad for p in bare.vision_model.parameters())
    blocker = cache_blocker(bare, vision_trains, trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
    if blocker is not None:
        logger.info("not caching vision features: %s", blocker)
        return None
    precision = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"
    tower = tower_fingerprint(bare.vision_model, image_processor, precision) if config.vision_cache_dir else ""
    return VisionFeatureCache(int(config.vision_cache_gb * 1e9), config.vision_cache_dir, tower_id=tower)
