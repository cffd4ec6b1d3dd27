"""skad: image anomaly detectors for industrial inspection, as scikit-learn estimators."""

from ._backbone import WeightsNotFoundError
from ._patchcore import PatchCore
from .base import BaseDetector

__version__ = "0.1.0"

__all__ = ["BaseDetector", "PatchCore", "WeightsNotFoundError", "__version__"]
