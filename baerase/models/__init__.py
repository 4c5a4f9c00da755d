"""Reference architectures and safe model I/O."""

from .io import load_model, save_model, sha256_file
from .nets import ARCHITECTURES, BasicBlock, Bottleneck, ResNet18, ResNet50, SmallCNN, build

__all__ = [
    "ARCHITECTURES",
    "BasicBlock",
    "Bottleneck",
    "ResNet18",
    "ResNet50",
    "SmallCNN",
    "build",
    "load_model",
    "save_model",
    "sha256_file",
]
