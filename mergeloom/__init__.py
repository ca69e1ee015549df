"""mergeloom: data-free model merging and Weight Weaving on dicts of tensors.

Weight Weaving lives in ``mergeloom.weave`` (``from mergeloom.weave import weave``): not
re-exported here, so that ``from mergeloom import weave`` is the module.
"""

from mergeloom.methods import METHODS, get
from mergeloom.vectors import StateDict, TaskVector, apply, load, load_task_vectors, save

__all__ = [
    "METHODS",
    "StateDict",
    "TaskVector",
    "apply",
    "get",
    "load",
    "load_task_vectors",
    "save",
]
