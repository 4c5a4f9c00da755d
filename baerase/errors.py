"""The errors baerase raises. Every user-facing failure is one of these, with a message that
names the problem and, where there is one, the fix."""


class BaeraseError(Exception):
    """Base class of every error baerase raises on purpose."""


class InputError(BaeraseError, ValueError):
    """Bad model, data, labels or arguments given by the caller."""


class ConfigError(BaeraseError, ValueError):
    """An invalid configuration value."""


class LoadError(BaeraseError, OSError):
    """A model or data file that cannot be read safely."""


class BackendError(BaeraseError, RuntimeError):
    """A requested compute backend is not available."""


class DivergenceError(BaeraseError, RuntimeError):
    """An optimisation produced NaN/inf and could not be recovered."""
