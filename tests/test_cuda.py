"""The CUDA path: runs only where a GPU is present (skipped on CPU-only machines)."""

import pickle

import numpy as np
import pytest
import torch

from test_contract import DETECTORS, _fit, _ready

from skad import PatchCore
from skad.datasets import make_textures

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _tensors(obj, seen=None):
    """Every tensor reachable from a detector's state (modules included)."""
    if isinstance(obj, torch.nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_fit_on_cuda_pickles_to_cpu_and_matches():
    data = make_textures(n_domains=1, n_normal=10, n_anomalous=4, image_size=64, random_state=0)
    det = PatchCore(backbone="test_resnet", weights=None, image_size=64, device="cuda",
                    random_state=0).fit(data.images[:8])
    cuda_scores = det.decision_function(data.images[8:])
    assert next(det.backbone_.parameters()).device.type == "cuda"
    state = det.__getstate__()
    assert all(t.device.type == "cpu" for t in _tensors(state))
    loaded = pickle.loads(pickle.dumps(det)).set_params(device="cpu")
    np.testing.assert_allclose(loaded.decision_function(data.images[8:]), cuda_scores,
                               rtol=0.02, atol=0.02 * np.ptp(cuda_scores))
    # pickling did not move the live detector off the GPU
    assert next(det.backbone_.parameters()).device.type == "cuda"


@pytest.mark.parametrize(("factory", "fit_kwargs"), DETECTORS)
def test_a_cuda_fitted_model_file_loads_on_the_cpu(factory, fit_kwargs, tmp_path):
    """skad.save from a GPU machine, skad.load on a CPU-only one (device="cpu")."""
    import skad

    data = make_textures(n_domains=2, n_normal=8, n_anomalous=4, image_size=32, random_state=0)
    det = _ready(_fit(factory, fit_kwargs, data, device="cuda"), data)
    cpu = pickle.loads(pickle.dumps(det)).set_params(device="cpu")
    path = skad.save(det, tmp_path / "m.skad")
    loaded = skad.load(path, device="cpu")
    assert all(t.device.type == "cpu" for t in _tensors(loaded.__dict__))
    # the file holds exactly the pickle's CPU state: the same scores on the CPU
    np.testing.assert_array_equal(loaded.decision_function(data.images),
                                  cpu.decision_function(data.images))
