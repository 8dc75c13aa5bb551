"""Training/eval data: many file formats read into one `Example` record.

    from vlm.data import load_examples, open_example_image, Example
"""

from .records import TASKS, Example, ExampleList

__all__ = ["TASKS", "Example", "ExampleList", "load_examples", "open_example_image"]


def __getattr__(name):
    # The loaders arrive in a later commit; importing them lazily keeps `Example` importable now.
    if name in ("load_examples", "open_example_image"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(name)
