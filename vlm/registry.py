"""Named model and dataset sources: an extension point that packages declare as entry points.

A package (ours, a plugin, a user's own) names a source in its metadata::

    [project.entry-points."vlm.models"]
    vlm-demo = "vlm.demo:demo_checkpoint"       # () -> checkpoint folder

    [project.entry-points."vlm.datasets"]
    easyvqa = "vlm.demo:easyvqa_data"            # () -> {split name: data file}

    [project.entry-points."vlm.chat_examples"]
    vlm-demo = "vlm.demo:chat_examples"          # (folder) -> [(question, picture)] for the chat page

`load_pretrained("vlm-demo")` (and `load_pretrained()`, whose default is `DEFAULT_MODEL`) then
resolves the name through the registry, and `load_examples("easyvqa:train")` finds the file. The
core never imports a source's code until that name is asked for, so importing `vlm` stays light.
"""

from __future__ import annotations

import os
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from .errors import VLMError

MODELS_GROUP = "vlm.models"
DATASETS_GROUP = "vlm.datasets"
EXAMPLES_GROUP = "vlm.chat_examples"  # name -> (folder) -> [(question, picture)] for the chat page
# What `load_pretrained()` with no name loads: the offline demo that `vlm` itself registers.
DEFAULT_MODEL = "vlm-demo"


def _entry_point(group: str, name: str) -> EntryPoint | None:
    found = entry_points(group=group, name=name)
    return next(iter(found), None)


def registered(group: str) -> list[str]:
    """Names registered in `group` (installed packages' entry points), sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


def resolve_model(name: str) -> str:
    """The checkpoint folder a registered model name stands for; any other name unchanged.

    A local folder of that name wins over the registry, so a user's `./vlm-demo` folder loads as
    itself. The source builds or fetches its checkpoint on first use.
    """
    if os.path.exists(name):
        return name
    ep = _entry_point(MODELS_GROUP, name)
    if ep is None:
        if name == DEFAULT_MODEL:
            raise VLMError(
                f"no model source named {name!r} is installed (entry point group {MODELS_GROUP!r}); "
                "reinstall vlm, or pass a model folder or hub id"
            )
        return name
    return str(ep.load()())


def resolve_dataset(name: str) -> Path | None:
    """The data file of `SOURCE:SPLIT` when SOURCE is a registered dataset source, else None."""
    source, sep, split = name.partition(":")
    if not sep or not source or os.path.exists(name):
        return None
    ep = _entry_point(DATASETS_GROUP, source)
    if ep is None:
        return None
    files = ep.load()()
    if split not in files:
        known = ", ".join(f"{source}:{k}" for k in files)
        raise VLMError(f"{name}: unknown {source} split; use one of {known}")
    return Path(files[split])


def model_examples(name: str, folder: str | os.PathLike) -> list[tuple[str, Path]]:
    """Example (question, picture) pairs a registered model source offers for the chat page, the
    pictures copied into `folder` (none for other models, or when the source has none at hand)."""
    ep = _entry_point(EXAMPLES_GROUP, name)
    return [] if ep is None else [(question, Path(path)) for question, path in ep.load()(Path(folder))]
