"""skad: image anomaly detectors for industrial inspection, as scikit-learn estimators.

Detectors take images (arrays or file paths), follow scikit-learn's estimator
API and score with higher = more anomalous. See ``README.md`` and ``docs/``.
"""

from . import datasets, metrics, model_selection
from ._backbone import WeightsNotFoundError
from ._mmr import MMR
from ._patchcore import PatchCore
from .base import BaseDetector

__version__ = "0.1.0"

__all__ = [
    "BaseDetector",
    "MMR",
    "PatchCore",
    "WeightsNotFoundError",
    "datasets",
    "metrics",
    "model_selection",
    "__version__",
]
