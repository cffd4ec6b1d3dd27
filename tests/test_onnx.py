"""ONNX export of the scoring path: onnxruntime on the CPU gives skad's scores and maps.

Each detector is tiny (random weights, 32 px), fitted once for the module and
exported once (about 5-15 s each on 2 cores); the graph is run on images that
are not among the references, in batches of other sizes than the export's.
"""

import copy
import importlib.util
import json
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import skad
from skad import MMR, GeneralAD, GlobalLocal, MetaComparer, PatchCore, export_onnx
from skad._onnx import METADATA_KEYS, OUTPUTS
from skad.cli import main
from skad.datasets import make_textures

SIZE = 32
# relative error allowed between the graph and skad: max |onnx - skad| / max |skad|
RTOL = 1e-3

DETECTORS = {
    "PatchCore": lambda: PatchCore(backbone="test_resnet", weights=None, image_size=SIZE,
                                   random_state=0),
    # the released code's embedding: gathers of the pooling bins inside the graph
    "PatchCore-embedding": lambda: PatchCore(backbone="test_resnet", weights=None,
                                             image_size=SIZE, embedding_dim=(100, 48),
                                             random_state=0),
    "GeneralAD": lambda: GeneralAD(backbone="test_efficientnet", weights=None, layers=(2,),
                                   hidden_dim=32, n_epochs=1, image_size=SIZE, random_state=0),
    "MMR": lambda: MMR(teacher="test_efficientnet", teacher_weights=None, student="test_vit",
                       student_weights=None, student_depth=1, n_epochs=1, image_size=SIZE,
                       random_state=0),
    "MetaComparer": lambda: MetaComparer(backbone="test_resnet", weights=None, image_size=SIZE,
                                         fpn_width=16, n_fpn_cells=1, hidden_layer_sizes=(16,),
                                         attention_dim=8, n_epochs=1, n_episodes=2,
                                         random_state=0),
    # a single reference: its fused maps centre the nearest part on each image (a sort)
    "MetaComparer-one-reference": lambda: MetaComparer(
        backbone="test_resnet", weights=None, image_size=SIZE, fpn_width=16, n_fpn_cells=1,
        hidden_layer_sizes=(16,), attention_dim=8, n_epochs=1, n_episodes=2, random_state=0),
    "GlobalLocal": lambda: GlobalLocal(teacher="test_efficientnet", teacher_weights=None,
                                       teacher_size=SIZE, patch_size=8, stride=4, embed_dim=16,
                                       width=8, n_distill_patches=8, n_distill_epochs=1,
                                       n_finetune_epochs=1, n_epochs=1, image_size=SIZE,
                                       random_state=0),
    # the whole image as context: windows share the Global-Net's stem (window_stems)
    "GlobalLocal-whole-image-context": lambda: GlobalLocal(
        teacher="test_efficientnet", teacher_weights=None, teacher_size=SIZE, patch_size=8,
        stride=4, context="image", embed_dim=16, width=8, n_distill_patches=8,
        n_distill_epochs=1, n_finetune_epochs=1, n_epochs=1, image_size=SIZE, random_state=0),
}


@pytest.fixture(scope="module")
def data():
    """Textures of two domains; the first 6 normals of the first are the references, its
    other 2 normals and 4 anomalous images are scored."""
    data = make_textures(n_domains=2, n_normal=8, n_anomalous=4, image_size=SIZE,
                         random_state=0)
    first = np.flatnonzero(data.groups == data.groups[0])
    normal = first[data.y[first] == 0]
    data.references, data.test = normal[:6], np.r_[normal[6:], first[data.y[first] == 1]]
    return data


@pytest.fixture(scope="module")
def fitted(data):
    """Each detector fitted, with the references set; built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            det = DETECTORS[name]()
            if det._one_class:
                det.fit(data.images[data.references])
            else:  # trained on every image of both domains, referenced on the first's normals
                det.fit(data.images, data.y, groups=data.groups)
                one = name.endswith("one-reference")
                det.set_reference(data.images[data.references[:1] if one else data.references])
                assert det.map_centring_ == one
            cache[name] = det
        return cache[name]

    return get


@pytest.fixture(scope="module")
def exported(fitted, tmp_path_factory):
    """Each fitted detector's graph (any batch size), exported on first use."""
    folder = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = export_onnx(fitted(name), folder / f"{name}.onnx")
        return cache[name]

    return get


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _nchw(images):
    """uint8 images (N, H, W, 3) as the graph takes them: float32 (N, 3, H, W) in [0, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255


def _relative_error(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("name", list(DETECTORS))
def test_graph_matches_skad(name, fitted, exported, data):
    det = fitted(name)
    session = _session(exported(name))
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    images = data.images[data.test]
    # batches of 1 and 5 images: the graph was traced on 2, and takes any number
    for batch in (images[:1], images[1:]):
        scores, maps, labels, masks = session.run(None, {"images": _nchw(batch)})
        expected_scores, expected_maps = det.score_and_map(batch)
        assert scores.shape == (len(batch),) and maps.shape == (len(batch), SIZE, SIZE)
        assert _relative_error(scores, expected_scores) < RTOL
        assert _relative_error(maps, expected_maps) < RTOL
        # the thresholds inside the graph are the detector's
        np.testing.assert_array_equal(labels, scores > det.threshold_)
        np.testing.assert_array_equal(masks, maps > det.pixel_threshold_)
        # and decide as skad does, but for a score within rounding of the threshold
        near = np.isclose(expected_scores, det.threshold_, rtol=RTOL)
        np.testing.assert_array_equal(labels[~near], det.predict(batch)[~near])


def test_metadata(fitted, exported):
    det = fitted("GeneralAD")
    meta = _session(exported("GeneralAD")).get_modelmeta()
    props = meta.custom_metadata_map
    assert set(props) == set(METADATA_KEYS)
    assert props["class_name"] == "GeneralAD" and meta.producer_name == "skad"
    assert props["skad_version"] == __import__("skad").__version__
    assert float(props["threshold"]) == det.threshold_
    assert float(props["pixel_threshold"]) == det.pixel_threshold_
    assert float(props["false_reject_rate"]) == det.false_reject_rate_
    assert json.loads(props["image_size"]) == [SIZE, SIZE]
    assert json.loads(props["standardize_positions"]) is True
    assert json.loads(props["params"])["top_k"] == det.top_k
    assert "[0, 1]" in props["input"] and "RGB" in props["input"]


def test_export_leaves_the_detector_as_it_was(fitted, exported, data):
    det = fitted("PatchCore")
    before = det.decision_function(data.images[data.test])
    exported("PatchCore")
    assert det.device == "auto" and det.memory_bank_.device.type == "cpu"
    np.testing.assert_array_equal(det.decision_function(data.images[data.test]), before)


def test_cli_export_with_a_fixed_batch(fitted, data, tmp_path, capsys):
    det = fitted("PatchCore")
    model, out = tmp_path / "m.skad", tmp_path / "graphs" / "m.onnx"
    skad.save(det, model)
    assert main(["export", "--model", str(model), "--format", "onnx", "--out", str(out),
                 "--batch-size", "4", "--false-reject-rate", "0.4"]) == 0
    recalibrated = copy.deepcopy(det).set_params(false_reject_rate=0.4).recalibrate()
    printed = capsys.readouterr().out
    assert "exported PatchCore" in printed
    assert f"threshold {recalibrated.threshold_:.4g} at a false-reject rate of" in printed
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left
    session = _session(out)
    assert session.get_inputs()[0].shape == [4, 3, SIZE, SIZE]
    images = data.images[data.test[:4]]
    scores, _, labels, _ = session.run(None, {"images": _nchw(images)})
    assert _relative_error(scores, det.decision_function(images)) < RTOL
    # the graph's labels compare with the threshold recalibrated for --false-reject-rate
    np.testing.assert_array_equal(labels, scores > recalibrated.threshold_)
    with pytest.raises(Exception, match="images"):  # a fixed batch takes 4 images only
        session.run(None, {"images": _nchw(images[:3])})


def test_cli_errors(tmp_path, capsys, monkeypatch):
    unfitted = tmp_path / "unfitted.joblib"
    joblib.dump(PatchCore(), unfitted)
    assert main(["export", "--allow-pickle", "--model", str(unfitted), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "has no reference" in capsys.readouterr().err
    assert main(["export", "--allow-pickle", "--model", str(unfitted), "--out",
                 str(tmp_path / "m.onnx"), "--false-reject-rate", "0.2"]) == 1
    assert "has no reference yet: pass --reference" in capsys.readouterr().err
    assert main(["export", "--allow-pickle", "--model", str(unfitted), "--out", str(tmp_path)]) == 1
    assert "must be a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: onnx is the only format
        main(["export", "--allow-pickle", "--model", str(unfitted), "--format", "tflite", "--out", "m"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    assert main(["export", "--allow-pickle", "--model", str(unfitted), "--out", str(tmp_path / "m.onnx")]) == 1
    assert 'pip install "skad[onnx]"' in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_unfitted_or_unreferenced_detectors_are_refused(tmp_path, data):
    with pytest.raises(NotFittedError):
        export_onnx(PatchCore(), tmp_path / "m.onnx")
    det = MetaComparer(backbone="test_resnet", weights=None, image_size=SIZE, fpn_width=16,
                       n_fpn_cells=1, hidden_layer_sizes=(16,), attention_dim=8, n_epochs=1,
                       n_episodes=1, random_state=0)
    det.fit(data.images, data.y, groups=data.groups)  # fitted, but no reference yet
    with pytest.raises(RuntimeError, match="set_reference"):
        export_onnx(det, tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="skad detectors"):
        export_onnx(object(), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_scoring_parameter_changed_since_calibration_is_refused(fitted, tmp_path):
    """The graph holds the thresholds: not exported with those of another sigma."""
    det = fitted("PatchCore")
    det.set_params(sigma=det.sigma + 1.0)
    try:
        with pytest.raises(ValueError, match="changed sigma from 4.0 to 5.0"):
            export_onnx(det, tmp_path / "m.onnx")
    finally:
        det.set_params(sigma=det.sigma - 1.0)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"opset": 17}, {"opset": "18"}])
def test_bad_arguments(fitted, tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        export_onnx(fitted("PatchCore"), tmp_path / "m.onnx", **kwargs)


def test_missing_package_names_the_extra(fitted, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r'pip install "skad\[onnx\]"'):
        export_onnx(fitted("PatchCore"), tmp_path / "m.onnx")
    assert not Path(tmp_path / "m.onnx").exists()
