"""Baseline backdoor defenses, for comparing against BAERASE on the same model and clean data.

Every defense has one shape, ``defense(model, images, labels, *, normalize=None, ...) -> model``:
it gets the defender's small clean hold-out set (float images [N, C, H, W] in [0, 1], int64
labels [N]) and returns a repaired copy in eval mode; the input model is never modified.

- :func:`fine_tune`: plain fine-tuning on the clean data.
- :func:`fine_prune`: Fine-Pruning (Liu et al. 2018): prune channels of the last feature map that
  stay dormant on clean data, then fine-tune.
- :func:`nad`: Neural Attention Distillation (Li et al. 2021): a fine-tuned teacher guides the
  student's attention maps.
- :func:`neural_cleanse`: Neural Cleanse (Wang et al. 2019): one mask + pattern reverse-engineered
  per class (:func:`reverse_engineer`), MAD outliers flagged, then unlearning by fine-tuning on
  images stamped with the flagged triggers under their true labels.
"""

from .common import DEFENSES, feature_layers
from .fine_prune import fine_prune
from .fine_tune import fine_tune
from .nad import attention_map, nad
from .neural_cleanse import NCReport, neural_cleanse, reverse_engineer

__all__ = [
    "DEFENSES",
    "NCReport",
    "attention_map",
    "feature_layers",
    "fine_prune",
    "fine_tune",
    "nad",
    "neural_cleanse",
    "reverse_engineer",
]

DEFENSES.update(fine_tune=fine_tune, fine_prune=fine_prune, nad=nad, neural_cleanse=neural_cleanse)
