"""skad: image anomaly detectors for industrial inspection, as scikit-learn estimators.

Detectors take images (arrays or file paths), follow scikit-learn's estimator
API and score with higher = more anomalous. See ``README.md`` and ``docs/``.
"""

from . import datasets, metrics, model_selection
from ._backbone import WeightsNotFoundError
from ._general_ad import GeneralAD
from ._global_local import GlobalLocal
from ._meta_comparer import MetaComparer
from ._mmr import MMR
from ._patchcore import PatchCore
from .base import BaseDetector

__version__ = "0.1.0"

__all__ = [
    "BaseDetector",
    "GeneralAD",
    "GlobalLocal",
    "MetaComparer",
    "MMR",
    "PatchCore",
    "WeightsNotFoundError",
    "datasets",
    "metrics",
    "model_selection",
    "__version__",
]
