"""mergeloom: data-free model merging and Weight Weaving on dicts of tensors.

Import the modules themselves (``from mergeloom import methods, weave, vectors``): this file
imports nothing, so that importing one module never loads (or, for DVC, depends on) another.
"""
