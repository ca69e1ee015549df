"""YAML read the way DVC reads params files, so mergeloom and DVC see the same values.

PyYAML follows YAML 1.1, where a float needs a dot: `lr: 1e-3` is the string "1e-3". DVC reads
params.yaml as YAML 1.2, where it is the number 0.001, and `dvc exp run -S` writes such values.
This loader adds YAML 1.2's float form to PyYAML's safe loader (nothing else changes).
"""

from __future__ import annotations

import re

import yaml

YAMLError = yaml.YAMLError


class Loader(yaml.SafeLoader):
    """yaml.SafeLoader plus YAML 1.2 floats without a dot (1e-3, -2E+5)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load(text: str) -> object:
    """Parse one YAML document safely (no arbitrary objects), 1e-3 being a number."""
    return yaml.load(text, Loader=Loader)
