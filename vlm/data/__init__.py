"""Training/eval data: many file formats read into one `Example` record.

    from vlm.data import load_examples, open_example_image, Example

See `load_examples` for the formats and the checks made before anything trains.
"""

from .loader import FORMATS_HELP, image_key, load_examples, open_example_image, open_example_images
from .records import TASKS, Example, ExampleList

__all__ = ["FORMATS_HELP", "TASKS", "Example", "ExampleList", "image_key", "load_examples", "open_example_image",
           "open_example_images"]
