"""Model files that run no code when loaded: :func:`save` and :func:`load`.

A skad model file is one `safetensors <https://huggingface.co/docs/safetensors>`_
file: every tensor and array of the fitted detector (network weights, memory
bank, reference statistics) as a named tensor, and in the file's metadata one
JSON document with the detector's class name, its parameters and its other
fitted attributes, the skad, torch and timm versions that wrote it and a short
model card. Reading it parses JSON and copies tensors; nothing in the file is
ever executed. :func:`load` accepts only skad's own detector classes and
rebuilds one from its parameters: each detector builds its networks' empty
architectures (``_empty_networks``, from its parameters and the saved shapes,
without reading or downloading pretrained weights) and the saved tensors fill
them.

Pickles (``joblib.dump``, ``pickle``) keep working for scikit-learn
workflows, but loading a pickle runs whatever code it holds: never load one
from a source you do not trust.

The JSON encodes the attribute values that are not tensors with a few tags, so
that they come back with their types: ``{"tuple": [...]}``, ``{"dict":
{...}}``, ``{"tensor": key}`` and ``{"ndarray": key}`` (a tensor of the file),
``{"strings": [...]}`` (an array of strings), ``{"module": attr}`` (a network
whose tensors are ``attr.<name>``), ``{"path": ...}``, ``{"device": ...}`` and
``{"float": "nan"}`` (non-finite floats). Lists, strings, numbers, booleans and
None are themselves.
"""

import datetime
import hashlib
import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._files import write_atomic
from .thresholds import CalibrationWarning

__all__ = ["ModelFileError", "ModelVersionWarning", "fingerprint", "load", "model_info",
           "save"]

logger = logging.getLogger(__name__)

#: the "format" field of every skad model file
FORMAT = "skad.model"
#: the layout this skad writes; it reads this and every earlier one
FORMAT_VERSION = 1
#: the metadata key of the JSON header in the safetensors file
_HEADER_KEY = "skad"
#: a safetensors file starts with the 8-byte length of its JSON header, then "{"
_SAFETENSORS_OPENING = b"{"
#: opcodes a protocol 0 or 1 pickle can open with (pickletools: MARK, GLOBAL, EMPTY_LIST,
#: EMPTY_DICT, EMPTY_TUPLE, the constants)
_OLD_PICKLE_OPENINGS = [bytes([c]) for c in b"(c]})ILFSVNKMJGTUX"]


class ModelFileError(ValueError):
    """A file that is not a skad model file, or one that this skad cannot read."""


class ModelVersionWarning(UserWarning):
    """The model file was written by another version of skad, torch or timm."""


def _detector_classes():
    """skad's own detectors by class name: the only classes :func:`load` builds."""
    from ._general_ad import GeneralAD
    from ._global_local import GlobalLocal
    from ._meta_comparer import MetaComparer
    from ._mmr import MMR
    from ._patchcore import PatchCore

    return {cls.__name__: cls for cls in (PatchCore, GeneralAD, MMR, MetaComparer, GlobalLocal)}


def _versions():
    import timm

    from . import __version__

    return {"skad": __version__, "torch": torch.__version__.split("+")[0],
            "timm": timm.__version__}


# ----------------------------------------------------------------- encoding
class _Encoder:
    """Attribute values to JSON, their tensors collected under unique keys."""

    def __init__(self):
        self.tensors = {}
        self._storages = set()

    def add(self, key, tensor):
        t = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of one
        # storage): a second user of a storage gets its own copy
        storage = (t.untyped_storage().data_ptr(), t.device.type)
        if storage in self._storages or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()
        self._storages.add((t.untyped_storage().data_ptr(), t.device.type))
        self.tensors[key] = t
        return key

    def module(self, key, module):
        # parameters and every buffer, also the non-persistent ones (a backbone's
        # normalisation), which state_dict() leaves out
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            self.add(f"{key}.{name}", t)
        return {"module": key}

    def encode(self, value, key):
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, np.generic):
            return self.encode(value.item(), key)
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, f"{key}.{i}") for i, v in enumerate(value)]
            return items if isinstance(value, list) else {"tuple": items}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {"dict": {k: self.encode(v, f"{key}.{k}") for k, v in value.items()}}
        if isinstance(value, torch.nn.Module):
            return self.module(key, value)
        if isinstance(value, torch.Tensor):
            return {"tensor": self.add(key, value)}
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "US":
                return {"strings": value.tolist(), "shape": list(value.shape)}
            if value.dtype.kind not in "biuf":
                raise TypeError(f"an array of dtype {value.dtype}")
            return {"ndarray": self.add(key, torch.from_numpy(np.ascontiguousarray(value)))}
        if isinstance(value, os.PathLike):
            return {"path": os.fspath(value)}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        raise TypeError(f"a {type(value).__name__}")


def _encode_state(det):
    """The detector's ``__dict__`` as JSON and tensors; parameters that cannot be stored
    (a ``random_state`` generator) are stored as None, with a warning."""
    encoder = _Encoder()
    state = {}
    for name, value in det.__getstate__().items():
        if name == "random_state" and isinstance(value, (np.random.RandomState,
                                                         np.random.Generator)):
            warnings.warn(f"random_state is a {type(value).__name__}, which a model file "
                          "does not store: it is saved as None (it only matters to a new "
                          "fit)", UserWarning, stacklevel=3)
            value = None
        try:
            state[name] = encoder.encode(value, name)
        except TypeError as exc:
            raise TypeError(f"cannot save {type(det).__name__}: attribute {name!r} holds "
                            f"{exc}, which a skad model file cannot store") from None
    return state, encoder.tensors


def _saved_date():
    """Now, or ``SOURCE_DATE_EPOCH`` where set: the reproducible-builds convention, so that
    two saves of the same detector give the same bytes."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
           else datetime.datetime.now(datetime.timezone.utc))
    return now.isoformat(timespec="seconds")


def _model_card(det, versions):
    """What an engineer needs to know about a model without loading it."""
    quantile = det.threshold_quantile
    rule = ("conformal" if quantile == "deprecated" else f"quantile {quantile:g} of the "
            "reference scores (deprecated threshold_quantile)")
    return {
        "detector": type(det).__name__,
        "n_training_images": getattr(det, "n_samples_fit_", None),
        "image_size": det.image_size,
        "n_references": getattr(det, "n_references_", None),
        "threshold_rule": rule,
        "false_reject_rate": det.false_reject_rate,
        "false_reject_rate_bound": getattr(det, "false_reject_rate_", None),
        "threshold": getattr(det, "threshold_", None),
        "pixel_threshold": getattr(det, "pixel_threshold_", None),
        "saved": _saved_date(),
        "skad_version": versions["skad"],
    }


def save(detector, path):
    """Save a fitted detector to a model file that runs no code when loaded.

    The file is a `safetensors` file (:mod:`skad._serialization`): the
    detector's tensors and arrays, and in its metadata its class, parameters,
    other fitted attributes, the versions of skad, torch and timm, and a model
    card (:func:`model_info`). Modules and tensors are stored from the CPU, so
    a model fitted on a GPU loads on a CPU-only machine. The file is written
    under a temporary name and renamed when complete: an interrupted save
    leaves no partial file, and an existing file at ``path`` is replaced only
    by a complete one.

    Parameters
    ----------
    detector : BaseDetector
        A fitted skad detector (PatchCore, GeneralAD, MMR, MetaComparer or
        GlobalLocal).
    path : str or path-like
        The file to write (by convention ``*.skad``). Its folder is created.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If the detector is not fitted.
    TypeError
        If ``detector`` is not one of skad's detectors, or one of its
        attributes holds an object the format cannot store (named).

    Warns
    -----
    skad.thresholds.CalibrationWarning
        If ``set_params`` changed a parameter that scoring reads since the
        reference was set: the file is written as it is, and the model it
        holds refuses to decide (``skad score`` too) until its reference is
        set again.

    See Also
    --------
    load : Read the file back.

    Examples
    --------
    >>> import numpy as np, skad, tempfile, os
    >>> from skad.datasets import make_textures
    >>> data = make_textures(n_domains=1, n_normal=6, n_anomalous=2, image_size=32,
    ...                      random_state=0)
    >>> det = skad.PatchCore(backbone="test_resnet", weights=None, image_size=32,
    ...                      false_reject_rate=0.2,  # 6 normals support 1/7 and above
    ...                      random_state=0).fit(data.images[data.y == 0])
    >>> path = skad.save(det, os.path.join(tempfile.mkdtemp(), "model.skad"))
    >>> loaded = skad.load(path)
    >>> bool(np.array_equal(loaded.decision_function(data.images),
    ...                     det.decision_function(data.images)))
    True
    """
    from safetensors.torch import save as to_bytes

    classes = _detector_classes()
    if type(detector) not in classes.values():
        raise TypeError(f"skad.save saves skad's detectors ({', '.join(classes)}); got "
                        f"{type(detector).__name__}: use joblib for other estimators")
    check_is_fitted(detector)
    n_changed, changed = detector._changed_since_calibration()
    if n_changed:
        warnings.warn(CalibrationWarning(
            f"{type(detector).__name__}: set_params changed {changed} since its reference was "
            f"set: the model saved to {path} refuses to decide (predict, skad score) until "
            f"set_reference (skad score: --reference DIR) calibrates at the new "
            f"value{'s' if n_changed > 1 else ''}"),
            stacklevel=2)
    versions = _versions()
    state, tensors = _encode_state(detector)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "class": type(detector).__name__, "versions": versions,
              "model_card": _model_card(detector, versions), "state": state}
    # written by Python, so the file gets the user's umask (safetensors' own writer makes
    # it private, mode 0600)
    path = write_atomic(path, to_bytes(tensors, metadata={_HEADER_KEY: json.dumps(header)}))
    logger.info("saved %s to %s (%d tensors)", type(detector).__name__, path, len(tensors))
    return path


# parameters that change how a detector computes, not what: left out of its fingerprint
_NOT_FINGERPRINTED = ("device", "verbose", "batch_size")


def fingerprint(det):
    """A SHA-256 digest of what a detector computes with.

    Over its class, its fitted attributes and tensors and its parameters, but
    ``device``, ``verbose`` and ``batch_size``, which change how it computes,
    not what. Two loads of one model file give the same digest; a model
    fitted or calibrated otherwise (another reference) gives another.

    Parameters
    ----------
    det : BaseDetector
        A fitted skad detector.

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random_state generator: stored as None, fine here
        state, tensors = _encode_state(det)
    for name in _NOT_FINGERPRINTED:
        state.pop(name, None)
    digest = hashlib.sha256(type(det).__name__.encode())
    digest.update(json.dumps(state, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ----------------------------------------------------------------- decoding
def is_pickle(path):
    """Whether the file opens as a pickle or as one of joblib's compressed pickles.

    Only the first bytes are read: nothing is unpickled.
    """
    with open(path, "rb") as fh:
        opening = fh.read(6)
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        ending = fh.read(1)
    zlib = len(opening) >= 2 and opening[0] == 0x78 and int.from_bytes(opening[:2]) % 31 == 0
    # protocols 0 and 1 open with one of a few opcodes (MARK, GLOBAL, EMPTY_LIST, ...) and,
    # as every pickle, end with STOP (".")
    old_protocol = opening[:1] in _OLD_PICKLE_OPENINGS and ending == b"."
    # pickle protocol >= 2 opens with PROTO (0x80); then joblib's compressors: zlib
    # (joblib's default), gzip, bz2, xz, lzma
    return zlib or old_protocol or opening.startswith((b"\x80", b"\x1f\x8b", b"BZh",
                                                       b"\xfd7zXZ", b"\x5d\x00\x00"))


def _open(path):
    """The safetensors file of a skad model file, open (a context manager), read once by
    :func:`_read_header` and :func:`load`; :class:`ModelFileError` for anything else."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} "
                                f"{'is not a file' if path.exists() else 'does not exist'}")
    with open(path, "rb") as fh:
        opening = fh.read(9)
    if not opening:
        raise ModelFileError(f"{path} is empty: not a skad model file")
    if len(opening) < 9 or opening[8:9] != _SAFETENSORS_OPENING:
        kind = " It looks like a pickle (joblib)." if is_pickle(path) else ""
        raise ModelFileError(f"{path} is not a skad model file (a safetensors file written "
                             f"by skad.save).{kind}")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file: {exc} (is it "
                             "complete?)") from exc


def _read_header(fh, path):
    """The JSON header of the open skad model file ``fh``; :class:`ModelFileError` for
    anything else."""
    text = (fh.metadata() or {}).get(_HEADER_KEY)
    if text is None:
        raise ModelFileError(f"{path} is a safetensors file but not a skad model file (no "
                             f"{_HEADER_KEY!r} metadata)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the skad header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: the skad header does not describe a skad model")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written in skad model format {version!r}, which "
                             f"this skad ({_versions()['skad']}) cannot read: upgrade skad")
    return header


class _Decoder:
    """JSON values back to attribute values; tensors read from the open file."""

    def __init__(self, fh, path):
        self.fh, self.path = fh, path
        self.keys = set(fh.keys())
        self.modules = {}

    def tensor(self, key):
        if not isinstance(key, str) or key not in self.keys:
            raise ModelFileError(f"{self.path}: the header names a tensor {key!r} that the "
                                 "file does not hold")
        return self.fh.get_tensor(key)

    def decode(self, value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not isinstance(value, dict) or len(value) not in (1, 2):
            raise ModelFileError(f"{self.path}: unexpected value {str(value)[:80]} in the header")
        tag, content = next(iter(value.items()))
        if tag == "tuple":
            return tuple(self.decode(v) for v in content)
        if tag == "dict":
            return {str(k): self.decode(v) for k, v in content.items()}
        if tag == "tensor":
            return self.tensor(content)
        if tag == "ndarray":
            return self.tensor(content).numpy()
        if tag == "strings":
            return np.asarray(content).reshape(value.get("shape", [-1]))
        if tag == "module":
            self.modules[content] = None  # built by the detector, filled by _fill
            return None
        if tag == "path":
            return Path(content)
        if tag == "device":
            return torch.device(content)
        if tag == "float":
            return float(content)
        raise ModelFileError(f"{self.path}: unknown tag {tag!r} in the header")


def _fill(module, name, decoder):
    """Copy the saved tensors ``name.*`` into a freshly built ``module``."""
    expected = {f"{name}.{k}": t for k, t in (*module.named_parameters(),
                                               *module.named_buffers())}
    saved = {k for k in decoder.keys if k.startswith(f"{name}.")}
    if saved != set(expected):
        missing, extra = sorted(set(expected) - saved), sorted(saved - set(expected))
        raise ModelFileError(
            f"{decoder.path}: the saved {name} does not fit the network this skad builds "
            f"(missing {missing[:3]}, unexpected {extra[:3]}): was it written by another "
            "skad or timm version?")
    with torch.no_grad():
        for key, target in expected.items():
            value = decoder.tensor(key)
            if value.shape != target.shape:
                raise ModelFileError(f"{decoder.path}: {key} has shape {tuple(value.shape)}; "
                                     f"the network expects {tuple(target.shape)}")
            target.copy_(value)
    # built on the meta device (load): a tensor that is neither parameter nor buffer was
    # not filled, and would fail at the first score
    for sub in module.modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                raise RuntimeError(f"{name}: {type(sub).__name__}.{attr} is a tensor that is "
                                   "neither a parameter nor a buffer, so a model file cannot "
                                   "restore it")
    # a loaded model scores: inference mode, no gradients; fit builds its networks anew
    module.requires_grad_(False).eval()


def _check_versions(header, path):
    saved, here = header.get("versions", {}), _versions()

    def minor(v):
        return ".".join(str(v).split(".")[:2])

    differ = [f"{k} {saved.get(k)} (here {here[k]})" for k in here
              if (saved.get(k) != here[k] if k == "skad" else minor(saved.get(k)) != minor(here[k]))]
    if differ:
        warnings.warn(f"{path} was written with {', '.join(differ)}: scores may differ; "
                      "check them on a few known images, or save the model again with this "
                      "version", ModelVersionWarning, stacklevel=3)


def load(path, *, device=None):
    """Load a detector saved by :func:`save`, without running any code from the file.

    Only skad's own detector classes are built: from the saved parameters,
    their networks' architectures (no pretrained weights are read or
    downloaded), then filled with the saved tensors. The loaded detector
    scores exactly as the saved one did.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save` (or ``skad fit``).
    device : str or torch.device, optional
        Sets the detector's ``device`` parameter (e.g. ``"cpu"`` for a model
        fitted with ``device="cuda"``); by default the saved one is kept.

    Returns
    -------
    detector : BaseDetector
        Fitted, with its reference and thresholds.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ModelFileError
        A ``ValueError``: the file is not a skad model file (a pickle, another
        safetensors file, a truncated file), names a class that is not one of
        skad's detectors, or its tensors do not fit the networks.

    Warns
    -----
    ModelVersionWarning
        When the file was written by another skad version, or another torch
        or timm minor version.

    See Also
    --------
    save, model_info
    """
    with _open(path) as fh:
        header = _read_header(fh, path)
        classes = _detector_classes()
        name = header.get("class")
        if name not in classes:
            raise ModelFileError(f"{path} holds a {name!r}, which is not one of skad's "
                                 f"detectors ({', '.join(classes)})")
        _check_versions(header, path)
        state = header.get("state")
        if not isinstance(state, dict):
            raise ModelFileError(f"{path}: the skad header has no detector state")
        decoder = _Decoder(fh, path)
        values = {str(k): decoder.decode(v) for k, v in state.items()}
        det = classes[name].__new__(classes[name])
        det.__setstate__(values)  # upgrades renamed parameters, as unpickling does
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in decoder.keys}
        # built on the meta device: no memory, no random initialisation to pay for, since
        # every parameter and buffer is then filled from the file
        with torch.device("meta"):
            networks = det._empty_networks(shapes)
        networks = {k: m.to_empty(device="cpu") for k, m in networks.items()}
        if set(networks) != set(decoder.modules):
            raise ModelFileError(f"{path}: the file holds the networks "
                                 f"{sorted(decoder.modules)}; {name} has {sorted(networks)}")
        for attr, module in networks.items():
            _fill(module, attr, decoder)
            setattr(det, attr, module)
    det._validate_params()
    if device is not None:
        det.set_params(device=device)
    logger.info("loaded %s from %s", name, path)
    return det


def model_info(path):
    """The versions and model card of a model file, without loading the detector.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`.

    Returns
    -------
    info : dict
        ``"class"``, ``"versions"`` (skad, torch, timm that wrote it),
        ``"model_card"`` (training image count, image size, references,
        threshold rule and level, the date it was saved) and ``"params"`` (the
        detector's parameters; a network passed as a parameter appears as
        ``"<module name>"``).

    Raises
    ------
    FileNotFoundError, ModelFileError
        As :func:`load`.
    """
    with _open(path) as fh:
        header = _read_header(fh, path)
    state = header.get("state", {})
    cls = _detector_classes().get(header.get("class"))
    names = set(cls._get_param_names()) if cls is not None else set()
    return {"class": header.get("class"), "versions": header.get("versions", {}),
            "model_card": header.get("model_card", {}),
            "params": {k: _plain(v) for k, v in state.items() if k in names}}


def _plain(value):
    """A header value as a reader wants it: tuples as tuples, paths and devices as text,
    a stored network or tensor by name; no tensor is read."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if not isinstance(value, dict) or not value:
        return value
    tag, content = next(iter(value.items()))
    if tag == "tuple":
        return tuple(_plain(v) for v in content)
    if tag == "dict":
        return {k: _plain(v) for k, v in content.items()}
    if tag in ("path", "device", "float"):
        return content if tag != "float" else float(content)
    return f"<{tag} {content}>" if tag in ("module", "tensor", "ndarray") else value
