"""Degradations and datasets for training and evaluating SIPL-PromptIR.

- :mod:`sipl_fast.data.degradations`: seeded synthetic degradations (noise, rain, haze, blur,
  low light, snow, JPEG and their composites) and the named task sets (3task, 5task, cdd11).
- :mod:`sipl_fast.data.datasets`: the ``--data`` sources (clean images + on-the-fly
  degradations, paired folders and their pair rules, the PromptIR and CDD-11 trees, the bundled
  scikit-image photos), training sets and their mixing, and lazily read evaluation sets.
- :mod:`sipl_fast.data.layouts`: recursive listing, pair rules and the dataset tree layouts.
"""
from .datasets import (PAIR_RULES, SKIMAGE_HELD_OUT, SKIMAGE_TRAIN, DataError, DataSource, DataWarning, DegradedCrops,
                       EvalSample, EvalSet, Item, LabelledCrops, MixedCrops, mixed_training_set, open_source,
                       sample_generator, skimage_photo, synthetic_eval_set)
from .degradations import DEGRADATIONS, TASK_SETS, degrade, resolve_tasks

__all__ = ["DEGRADATIONS", "TASK_SETS", "degrade", "resolve_tasks", "PAIR_RULES", "DataError", "DataWarning",
           "DataSource", "DegradedCrops", "LabelledCrops", "MixedCrops", "Item", "EvalSample", "EvalSet",
           "open_source", "mixed_training_set", "sample_generator", "skimage_photo", "synthetic_eval_set",
           "SKIMAGE_TRAIN", "SKIMAGE_HELD_OUT"]
