"""Degradations and datasets for training and evaluating SIPL-PromptIR.

- :mod:`sipl_fast.data.degradations`: seeded synthetic degradations (noise, rain, haze, blur,
  low light, snow, JPEG and their composites) and the named task sets (3task, 5task, cdd11).
- :mod:`sipl_fast.data.datasets`: clean images + on-the-fly degradations, paired folders, the
  bundled scikit-image photos, and the held-out evaluation sets.
"""
from .datasets import (SKIMAGE_HELD_OUT, SKIMAGE_TRAIN, DataError, DataSource, DegradedCrops, EvalSample,
                       PairedCrops, open_source, sample_generator, skimage_photo, synthetic_eval_set)
from .degradations import DEGRADATIONS, TASK_SETS, degrade, resolve_tasks

__all__ = ["DEGRADATIONS", "TASK_SETS", "degrade", "resolve_tasks", "DataError", "DataSource", "DegradedCrops",
           "PairedCrops", "EvalSample", "open_source", "sample_generator", "skimage_photo", "synthetic_eval_set",
           "SKIMAGE_TRAIN", "SKIMAGE_HELD_OUT"]
