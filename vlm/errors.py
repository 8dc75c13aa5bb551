"""The one exception type that users see as a clean, one-line message."""


class VLMError(Exception):
    """A problem with the user's input (a path, a flag, a config key, a file).

    The CLI prints ``error: <message>`` and exits non-zero, with no traceback
    unless ``--debug`` is given. The message must name the offending thing.
    """
