"""Export of a fitted detector's scoring path to ONNX.

:func:`export_onnx` writes one ONNX graph that takes a batch of images at the
detector's working size and gives what skad's own scoring gives for them:

=======  ======================  =============================================
name     shape, type             equals
=======  ======================  =============================================
images   (B, 3, H, W) float32    the input: RGB in [0, 1] (uint8 / 255), NCHW,
                                 at ``image_size``; no mean/std (the graph's)
scores   (B,) float32            ``decision_function``
maps     (B, H, W) float32       ``predict_map``
labels   (B,) int64              ``predict``: ``scores > threshold_``
masks    (B, H, W) bool          ``predict_mask`` with ``min_area=1``:
                                 ``maps > pixel_threshold_``
=======  ======================  =============================================

Everything scoring reads is inside: the networks, PatchCore's memory bank,
MetaComparer's references, the position statistics of
``standardize_positions=True`` and both thresholds (also in the model's
metadata, :data:`METADATA_KEYS`). The graph is the detector's own scoring
code, :meth:`skad.base.BaseDetector._score_standardized`, traced by
``torch.export`` (non-strict) and translated by PyTorch's ONNX exporter
(``torch.onnx.export(..., dynamo=True)``); the detectors keep their scoring
free of what a graph cannot hold: loops over the images of a batch, Python
numbers taken from tensors, blocks whose count depends on the batch size
(:func:`skad.base.row_blocks`).

The exported graph computes in float32 on any ONNX runtime; skad computes in
float16 on CUDA, so the graph matches skad's scores on the CPU (to about 1e-5
relative on the test detectors; tests/test_onnx.py checks 1e-3).
"""

import copy
import importlib.util
import json

import torch

from ._files import write_atomic
from ._images import image_hw
from .base import BaseDetector

__all__ = ["METADATA_KEYS", "OUTPUTS", "ScoringGraph", "export_onnx"]

#: the graph's outputs, in order
OUTPUTS = ("scores", "maps", "labels", "masks")
#: the keys of the model's metadata (``metadata_props``; onnxruntime:
#: ``session.get_modelmeta().custom_metadata_map``), each a string
METADATA_KEYS = ("skad_version", "class_name", "params", "image_size", "input", "outputs",
                 "threshold", "pixel_threshold", "false_reject_rate", "n_references",
                 "standardize_positions")
#: the opset of the graphs: the oldest PyTorch's exporter writes (ONNX Runtime reads it from 1.14)
DEFAULT_OPSET = 18
_INPUT = ("images: float32 (batch, 3, height, width), RGB, NCHW, values in [0, 1] (uint8 "
          "images divided by 255), at image_size (resize first); the backbone's mean/std "
          "normalisation is inside the graph")
_OUTPUTS = ("scores: float32 (batch,), decision_function; maps: float32 (batch, height, width), "
            "predict_map; labels: int64 (batch,), predict (scores > threshold); masks: bool "
            "(batch, height, width), predict_mask with min_area=1 (maps > pixel_threshold)")
# images in the example batch of a graph with an open batch size: torch.export takes a
# size of 0 or 1 for a constant
_EXAMPLE_BATCH = 2


def check_onnx_installed():
    """Raise ``ImportError`` saying what to install, if export cannot run here.

    It needs onnx and onnxscript (PyTorch's exporter) and torch 2.6 or later
    (``torch.compiler.is_exporting``, which the detectors' scoring asks).
    """
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs the package{'s' if len(missing) > 1 else ''} "
                          f"{' and '.join(missing)}: pip install \"skad[onnx]\"")
    if not hasattr(torch.compiler, "is_exporting"):
        raise ImportError(f"ONNX export needs torch 2.6 or later; this is torch "
                          f"{torch.__version__}: pip install \"torch>=2.6\"")


class ScoringGraph(torch.nn.Module):
    """A fitted detector's scoring path as a module: images -> the four :data:`OUTPUTS`.

    ``forward`` calls the detector's own scoring,
    :meth:`~skad.base.BaseDetector._score_standardized`, on a batch at the
    working size: the maps are those of :meth:`~skad.base.BaseDetector.predict_map`
    for images already at ``image_size`` (whose resizing then does nothing).

    Parameters
    ----------
    detector : BaseDetector
        Fitted, with a reference; its networks become this module's submodules
        (shared, not copied) and its position statistics buffers. Leave it on
        the CPU, in float32: :func:`export_onnx` works on a copy.
    """

    def __init__(self, detector):
        super().__init__()
        self.detector = detector
        # registered, so that .eval() and torch.export see the parameters as parameters
        self.networks = torch.nn.ModuleDict(
            {name: value for name, value in vars(detector).items()
             if isinstance(value, torch.nn.Module)})
        self.standardize = detector._standardizes_positions()
        if self.standardize:
            mean, std = detector._position_statistics(torch.device("cpu"))
            self.register_buffer("position_mean", mean.float())
            self.register_buffer("position_std", std.float())
        self.threshold = float(detector.threshold_)
        self.pixel_threshold = float(detector.pixel_threshold_)

    def forward(self, images):
        """``images (B, 3, H, W)`` float32 in [0, 1] -> scores, maps, labels, masks."""
        statistics = (self.position_mean, self.position_std) if self.standardize else None
        scores, maps = self.detector._score_standardized(images, True, statistics)
        scores, maps = scores.float(), maps.float()
        return scores, maps, (scores > self.threshold).long(), maps > self.pixel_threshold


def export_onnx(detector, path, *, batch_size=None, opset=DEFAULT_OPSET):
    """Write a fitted detector's scoring path as one ONNX graph (see :mod:`skad._onnx`).

    Parameters
    ----------
    detector : BaseDetector
        A fitted detector with a reference (``threshold_`` and
        ``pixel_threshold_`` set). It is not modified: the export works on a
        copy on the CPU.
    path : str or path-like
        The ``.onnx`` file to write; written through a temporary file in the
        same folder, so that no half-written model is ever left.
    batch_size : int or None, default=None
        None: the graph takes any number of images. An int fixes it (some
        runtimes, TensorRT among them, optimise a fixed shape best).
    opset : int, default=18
        ONNX opset of the graph (18 or later).

    Returns
    -------
    path : pathlib.Path
        The file written. Its input is ``images``, float32 ``(batch, 3, H, W)``
        with ``(H, W)`` the detector's ``image_size``, RGB in [0, 1]; its
        outputs are ``scores (batch,)``, ``maps (batch, H, W)``, ``labels
        (batch,)`` and ``masks (batch, H, W)`` (:data:`OUTPUTS`); the metadata
        (:data:`METADATA_KEYS`) hold the thresholds, ``image_size``, the
        parameters and skad's version.

    Raises
    ------
    ImportError
        If onnx or onnxscript is missing (``pip install "skad[onnx]"``).
    sklearn.exceptions.NotFittedError
        If the detector is not fitted.
    RuntimeError
        If it has no reference (no thresholds), or its reference predates what
        scoring needs now (call ``set_reference`` again).
    TypeError
        If ``detector`` is not a skad detector.
    ValueError
        If ``batch_size`` or ``opset`` is not a positive integer, or the graph
        exceeds ONNX's 2 GB limit of one file.

    Notes
    -----
    The graph computes in float32; on the CPU it matches ``decision_function``
    and ``predict_map`` to about 1e-6 relative. It holds the thresholds of the
    reference set at export: after ``set_reference`` or ``recalibrate``, export
    again. Time: a forward pass traced once, plus the translation (seconds to
    a minute).

    Examples
    --------
    >>> from skad import PatchCore, export_onnx
    >>> from skad.datasets import make_textures
    >>> data = make_textures(n_domains=1, n_normal=8, n_anomalous=2, image_size=32,
    ...                      random_state=0)
    >>> det = PatchCore(backbone="test_resnet", weights=None, image_size=32,
    ...                 false_reject_rate=0.2,  # 8 normals support 1/9 and above
    ...                 random_state=0).fit(data.images[:8])
    >>> path = export_onnx(det, tmp_path / "patchcore.onnx")  # doctest: +SKIP
    >>> import onnxruntime as ort  # doctest: +SKIP
    >>> session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # doctest: +SKIP
    >>> batch = data.images.transpose(0, 3, 1, 2).astype("float32") / 255  # NCHW in [0, 1]
    >>> scores, maps, labels, masks = session.run(None, {"images": batch})  # doctest: +SKIP
    >>> maps.shape  # doctest: +SKIP
    (10, 32, 32)
    """
    if not isinstance(detector, BaseDetector):
        raise TypeError(f"export_onnx exports skad detectors; got {type(detector).__name__}")
    for name, value in (("batch_size", batch_size), ("opset", opset)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if opset is None or opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be {DEFAULT_OPSET} or later (PyTorch's exporter); "
                         f"got {opset!r}")
    check_onnx_installed()
    detector._check_pixel_ready()  # fitted, with both thresholds
    detector._check_params()
    model = _to_onnx(_cpu_copy(detector), batch_size, opset)
    _set_metadata(model, detector)
    return _write_atomic(model, path)


def _cpu_copy(detector):
    """A copy of ``detector`` scoring on the CPU, in float32 (no CUDA autocast), quietly."""
    det = copy.deepcopy(detector)  # pickling's state: fitted tensors and modules on the CPU
    det.set_params(device="cpu", verbose=0)
    det._to_device(torch.device("cpu"))
    return det


def _to_onnx(detector, batch_size, opset):
    """The ONNX model (``onnx.ModelProto``) of ``detector``'s :class:`ScoringGraph`."""
    graph = ScoringGraph(detector).eval()
    height, width = image_hw(detector.image_size)
    n = _EXAMPLE_BATCH if batch_size is None else batch_size
    example = torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # once outside the trace: what scoring caches (GlobalLocal's interpolation
        # weights) is cached as real tensors, which the trace then takes as constants
        graph(example)
        dims = {"images": {0: torch.export.Dim("batch")}} if batch_size is None else None
        # torch.export first, on its own: a graph whose batch size the code fixes fails
        # here, where torch.onnx.export would fall back to a fixed size without a word
        program = torch.export.export(graph, (example,), dynamic_shapes=dims, strict=False)
        # optimize=False, then onnxscript's constant folding and dead-node removal alone:
        # its rewrite rules (onnxscript 0.7) take an Add of a constant within 1e-8 of 0 for a
        # no-op and remove it, which turned GlobalLocal's partial convolutions (count +
        # 1e-8) into divisions by 0. Unfolded, onnxruntime warns about CastLike nodes
        onnx_program = torch.onnx.export(program, (example,), dynamo=True, verbose=False,
                                         input_names=["images"], output_names=list(OUTPUTS),
                                         opset_version=opset, optimize=False)
    from onnxscript import optimizer

    optimizer.fold_constants(onnx_program.model)
    optimizer.remove_unused_nodes(onnx_program.model)
    return onnx_program.model_proto


def _set_metadata(model, detector):
    """The model's ``metadata_props`` (:data:`METADATA_KEYS`) and producer."""
    import onnx

    from . import __version__

    height, width = image_hw(detector.image_size)
    values = {
        "skad_version": __version__,
        "class_name": type(detector).__name__,
        "params": json.dumps(detector.get_params(), default=repr, sort_keys=True),
        "image_size": json.dumps([height, width]),
        "input": _INPUT,
        "outputs": _OUTPUTS,
        "threshold": repr(float(detector.threshold_)),
        "pixel_threshold": repr(float(detector.pixel_threshold_)),
        "false_reject_rate": repr(float(detector.false_reject_rate_)),
        "n_references": str(int(detector.n_references_)),
        "standardize_positions": json.dumps(detector._standardizes_positions()),
    }
    onnx.helper.set_model_props(model, values)
    model.producer_name, model.producer_version = "skad", __version__
    model.doc_string = (f"skad {type(detector).__name__}: images at {height} x {width} -> "
                        "anomaly scores and maps")


def _write_atomic(model, path):
    """Serialise ``model`` to ``path`` through a temporary file in the same folder."""
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf refuses messages over 2 GB
        raise ValueError(f"the ONNX graph is too large for one file ({exc}); ONNX keeps "
                         "up to 2 GB in a file: lower coreset_ratio or the number of "
                         "references") from exc
    return write_atomic(path, data)
