"""baerase: find and erase backdoors in image classifiers.

report = baerase.scan(model, images, labels)          # recover triggers, flag classes
result = baerase.erase(model, images, labels, report)  # unlearn, verify, keep accuracy
"""

import logging

__version__ = "0.1.0"

from .api import audit, erase, scan
from .config import Config
from .errors import BaeraseError, ConfigError, DivergenceError, InputError, LoadError
from .fleet import audit_many
from .report import ClassResult, EraseResult, ScanReport, write_outputs

# Library code only logs (``logging.getLogger(__name__)``); the application decides where it goes.
logging.getLogger(__name__).addHandler(logging.NullHandler())

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
    "audit_many",
    "erase",
    "scan",
    "write_outputs",
]
