"""YAML as `vlm train` reads it: PyYAML's safe loader, plus numbers as people write them, and
syntax errors as one line with their position."""

from __future__ import annotations

import re

import yaml


class NumberLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-3` as the number everyone means.

    PyYAML implements YAML 1.1, whose floats need a dot and a signed exponent (`1.0e-3`): `1e-3`
    stays a string and a typed key then rejects it. YAML 1.2 (and JSON, and Python) read it as a
    float; so do we, in config files and in `key=value` overrides alike.
    """


NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str):
    """`text` parsed as YAML with `NumberLoader`."""
    return yaml.load(text, Loader=NumberLoader)  # a SafeLoader: plain data only, no Python objects


def yaml_error(path: str, error: yaml.YAMLError) -> str:
    """A YAML syntax error as one line with its position: `file:line:column: not valid YAML (why)`."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    why = getattr(error, "problem", None) or str(error).splitlines()[0]
    hint = " (YAML indents with spaces, not tabs)" if "'\\t'" in why else ""
    return f"{where}: not valid YAML ({why}){hint}"
