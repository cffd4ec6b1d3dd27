"""The CUDA path: runs only where a GPU is present (skipped on CPU-only machines)."""

import pickle

import numpy as np
import pytest
import torch

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
