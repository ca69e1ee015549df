"""mergeloom: data-free model merging and Weight Weaving on dicts of tensors."""

from mergeloom.methods import METHODS, get
from mergeloom.vectors import StateDict, TaskVector, apply, load, load_task_vectors, save
from mergeloom.weave import POOLS, weave

__all__ = [
    "METHODS",
    "POOLS",
    "StateDict",
    "TaskVector",
    "apply",
    "get",
    "load",
    "load_task_vectors",
    "save",
    "weave",
]
