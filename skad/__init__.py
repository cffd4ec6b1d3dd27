"""skad: image anomaly detectors for industrial inspection, as scikit-learn estimators.

Detectors take images (arrays or file paths), follow scikit-learn's estimator
API and score with higher = more anomalous. See ``README.md`` and ``docs/``.

The public names are imported on first use (PEP 562), so that ``import skad``
and the command line's ``--help`` do not wait for torch and timm.

Messages (what a folder listing skipped, each epoch's loss) go to the ``skad``
logger and its children ``skad.<module>``; show them as for any library, with
:mod:`logging` (``logging.basicConfig(level=logging.INFO)``). Progress bars are
the detectors' ``verbose``.
"""

import importlib
import logging

__version__ = "0.2.0.dev0"

# public name -> module defining it (the submodules are their own entries)
_MODULES = {
    "BaseDetector": ".base",
    "GeneralAD": "._general_ad",
    "GlobalLocal": "._global_local",
    "MetaComparer": "._meta_comparer",
    "MMR": "._mmr",
    "ModelFileError": "._serialization",
    "ModelVersionWarning": "._serialization",
    "PatchCore": "._patchcore",
    "ReferenceScoredWarning": ".base",
    "WeightsNotFoundError": "._backbone",
    "datasets": ".datasets",
    "load": "._serialization",
    "model_info": "._serialization",
    "save": "._serialization",
    "export_onnx": "._onnx",
    "metrics": ".metrics",
    "model_selection": ".model_selection",
    "scoring": ".scoring",
    "thresholds": ".thresholds",
}

__all__ = [*_MODULES, "__version__"]

# a library configures no logging: records go where the application sends them, and
# nowhere (not Python's last-resort stderr output) when it sends them nowhere
logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_MODULES[name], __name__)
    value = module if _MODULES[name] == f".{name}" else getattr(module, name)
    globals()[name] = value  # later lookups do not come here
    return value


def __dir__():
    return sorted({*globals(), *__all__})
