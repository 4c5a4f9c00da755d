"""baerase: find and erase backdoors in image classifiers.

report = baerase.scan(model, images, labels)          # recover triggers, flag classes
result = baerase.erase(model, images, labels, report)  # unlearn, verify, keep accuracy
"""

__version__ = "0.1.0"

from .api import audit, erase, scan
from .config import Config
from .errors import BaeraseError, ConfigError, DivergenceError, InputError, LoadError
from .report import ClassResult, EraseResult, ScanReport, write_outputs

__all__ = [
    "BaeraseError",
    "ClassResult",
    "Config",
    "ConfigError",
    "DivergenceError",
    "EraseResult",
    "InputError",
    "LoadError",
    "ScanReport",
    "__version__",
    "audit",
    "erase",
    "scan",
    "write_outputs",
]
