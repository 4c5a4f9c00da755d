"""Reference architectures, safe model I/O and the torchvision / timm / Hugging Face hub sources."""

from .io import load_model, save_model, sha256_file
from .nets import ARCHITECTURES, BasicBlock, Bottleneck, ResNet18, ResNet50, SmallCNN, build
from .sources import Preprocessing, preprocessing_of, resolve_normalize

__all__ = [
    "ARCHITECTURES",
    "BasicBlock",
    "Bottleneck",
    "Preprocessing",
    "ResNet18",
    "ResNet50",
    "SmallCNN",
    "build",
    "load_model",
    "preprocessing_of",
    "resolve_normalize",
    "save_model",
    "sha256_file",
]
