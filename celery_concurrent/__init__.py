"""celery-concurrent: Modal-style concurrent inputs and per-function autoscaling for Celery."""

from .batching import BatchSettings
from .decorators import batched, concurrent
from .errors import (
    BatchResultError,
    ConcurrentError,
    ConfigurationError,
    DecoratorOrderError,
    GpuSpecError,
    UnknownFunctionError,
)
from .gpu import GpuRequest, parse_gpu
from .plugin import install
from .registry import spec_of, specs_of
from .spec import FunctionSpec

__all__ = [
    "BatchResultError",
    "BatchSettings",
    "ConcurrentError",
    "ConfigurationError",
    "DecoratorOrderError",
    "FunctionSpec",
    "GpuRequest",
    "GpuSpecError",
    "UnknownFunctionError",
    "batched",
    "concurrent",
    "install",
    "parse_gpu",
    "spec_of",
    "specs_of",
]

__version__ = "0.1.0"
