"""Data for baerase: embedded offline defaults and loaders for users' files.

Every loader returns ``(images, labels)``: a float32 tensor [N, C, H, W] in [0, 1] and an int64
tensor [N]. Failures raise :class:`baerase.errors.LoadError` (the file cannot be read) or
:class:`baerase.errors.InputError` (its content is wrong), naming the file and the problem.
"""

from baerase.data.builtin import MNIST_PATH, load_mnist, make_colour
from baerase.data.loaders import (
    IMAGE_SUFFIXES,
    load_cifar,
    load_dataset,
    load_gtsrb,
    load_idx,
    load_image_folder,
    load_npz,
    read_idx,
)
from baerase.data.safe_pickle import RestrictedUnpickler, safe_loads
from baerase.data.utils import as_tensors, split

__all__ = [
    "IMAGE_SUFFIXES",
    "MNIST_PATH",
    "RestrictedUnpickler",
    "as_tensors",
    "load_cifar",
    "load_dataset",
    "load_gtsrb",
    "load_idx",
    "load_image_folder",
    "load_mnist",
    "load_npz",
    "make_colour",
    "read_idx",
    "safe_loads",
    "split",
]
