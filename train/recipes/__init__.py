"""Training recipes, registered by name: `recipe: NAME` in a config picks one.

A recipe is a `Recipe` subclass (`base.py`) that owns what makes it that recipe: the model it loads
and what of it trains (freezing, LoRA wrapping, quantization), its data and collation, its loss
and what it saves. The trainer and `vlm train` call it and know no recipe by name.

The recipes that ship with vlm are one module each in this package (`BUILTIN`), imported when
first used. Others register the same way from anywhere:

    from vlm.train.recipes import Recipe, register_recipe

    @register_recipe
    class CaptionsOnly(Recipe):
        name = "captions-only"
        ...

or, from an installed package, without anyone importing it first, as an entry point::

    [project.entry-points."vlm.recipes"]
    captions-only = "my_package.recipes:CaptionsOnly"

Then `vlm train --recipe captions-only ...` (or `recipe: captions-only` in a YAML preset) trains it.
This module imports nothing of the rest of vlm.train, and no torch: the config (`recipe:` is checked
against these names) and `vlm train --help` read the names alone; recipe modules load when used.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from vlm.errors import VLMError

RECIPES_GROUP = "vlm.recipes"
# The recipes vlm ships: name -> module defining (and registering) it.
BUILTIN = {name: f"{__name__}.{name}" for name in ("stage1", "align", "bridge", "lora", "qlora", "full")}
_REGISTERED: dict[str, type] = {}


def _base():
    # Imported by name when needed: `base` imports the config, which imports this registry.
    return importlib.import_module(f"{__name__}.base")


def register_recipe(cls: type) -> type:
    """Register a `Recipe` subclass under its `name` (usable as a class decorator); returns it."""
    if not (isinstance(cls, type) and issubclass(cls, _base().Recipe)) or not cls.name:
        raise VLMError(f"{cls!r}: a recipe is a subclass of vlm.train.recipes.Recipe with a name")
    known = _REGISTERED.get(cls.name)
    if known is not None and known is not cls:
        raise VLMError(f"recipe {cls.name!r} is already registered ({known.__module__}.{known.__qualname__})")
    _REGISTERED[cls.name] = cls
    return cls


def recipe_names() -> list[str]:
    """Every recipe name a config may give: the built-in ones, then those registered from Python or
    declared by installed packages (entry point group `vlm.recipes`)."""
    others = set(_REGISTERED) | {ep.name for ep in entry_points(group=RECIPES_GROUP)}
    return [*BUILTIN, *sorted(others - set(BUILTIN))]


def get_recipe(name: str) -> type:
    """The recipe class registered as `name`; a VLMError naming the known ones when there is none."""
    if name not in _REGISTERED and name in BUILTIN:
        importlib.import_module(BUILTIN[name])  # the module registers its recipe
    if name not in _REGISTERED:
        found = entry_points(group=RECIPES_GROUP, name=name)
        if found:
            register_recipe(next(iter(found)).load())
    if name not in _REGISTERED:
        raise VLMError(f"recipe: unknown recipe {name!r} (known: {', '.join(recipe_names())})")
    return _REGISTERED[name]


def recipe_for(config):
    """The `Recipe` object of a run, for its `TrainConfig` (`config.recipe`), holding `config`."""
    return get_recipe(config.recipe)(config)


def prepare_model(config, device: str | None = None):
    """`(model, processor)` loaded and set up for training by `config`'s recipe (`Recipe.prepare_model`)."""
    return recipe_for(config).prepare_model(device)


def __getattr__(name: str):
    # `from vlm.train.recipes import Recipe`: the base class, imported (with torch) only when asked for.
    if name == "Recipe":
        return _base().Recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
