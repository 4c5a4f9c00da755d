"""Reference architectures and safe model I/O."""

from .io import load_model, save_model, sha256_file
from .nets import ARCHITECTURES, BasicBlock, ResNet18, SmallCNN, build

__all__ = [
    "ARCHITECTURES",
    "BasicBlock",
    "ResNet18",
    "SmallCNN",
    "build",
    "load_model",
    "save_model",
    "sha256_file",
]
