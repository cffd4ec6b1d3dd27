"""The generic layers of skad._layers, and fitted detectors pickled before they moved there."""

import importlib
import pickle

import pytest
import torch

import skad._layers as layers

# where each layer lived before skad._layers: pickles of fitted detectors name them so
OLD_PATHS = [
    ("skad._meta_comparer", "BiFPN"),
    ("skad._meta_comparer", "BiFPNCell"),
    ("skad._meta_comparer", "FastFusion"),
    ("skad._meta_comparer", "SeparableConv"),
    ("skad._global_local", "PartialConv2d"),
    ("skad._global_local", "partial_conv2d"),
    ("skad._general_ad", "PatchAttention"),
    ("skad._mmr", "SimpleFPNLevel"),
    ("skad._mmr", "sincos_2d"),
]


@pytest.mark.parametrize("module, name", OLD_PATHS)
def test_layers_are_importable_from_their_old_module(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(layers, name)


@pytest.mark.parametrize("module, name", [p for p in OLD_PATHS if p[1][0].isupper()])
def test_a_layer_pickled_under_its_old_module_loads(module, name, monkeypatch):
    cls = getattr(layers, name)
    with monkeypatch.context() as m:
        m.setattr(cls, "__module__", module)  # as pickled before the move
        data = pickle.dumps(cls)
    assert module.encode() in data
    assert pickle.loads(data) is cls


def test_an_old_bifpn_pickle_loads_with_its_weights(monkeypatch):
    """A whole module pickled with the old class paths loads and computes the same."""
    torch.manual_seed(0)
    bifpn = layers.BiFPN([8, 16], width=8, n_levels=3, n_cells=1).eval()
    with monkeypatch.context() as m:
        for name in ("BiFPN", "BiFPNCell", "FastFusion", "SeparableConv"):
            m.setattr(getattr(layers, name), "__module__", "skad._meta_comparer")
        data = pickle.dumps(bifpn)
    loaded = pickle.loads(data)
    feats = [torch.rand(1, 8, 8, 8), torch.rand(1, 16, 4, 4)]
    with torch.no_grad():
        for a, b in zip(loaded(feats), bifpn(feats)):
            torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ pooling
@pytest.mark.parametrize("n, size", [(4608, 1024), (9216, 1024), (2048, 1024), (360, 1024),
                                     (2048, 384), (10, 3), (7, 7), (1, 5)])
def test_adaptive_average_is_adaptive_avg_pool1d(n, size):
    """Any dimension, sizes that divide, do not divide, or exceed the input's (repeats)."""
    x = torch.randn(2, n, 3, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 1, n)
    expected = torch.nn.functional.adaptive_avg_pool1d(rows, size)
    expected = expected.view(2, 3, 2, size).permute(0, 3, 1, 2)
    torch.testing.assert_close(layers.adaptive_average(x, size, dim=1), expected)
    torch.testing.assert_close(layers.adaptive_average(rows, size), expected.permute(0, 2, 3, 1)
                               .reshape(-1, 1, size))


def test_neighbourhoods_are_unfold():
    x = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.unfold(x, 3, padding=1).view(2, 5 * 9, 6, 7)
    assert torch.equal(layers.neighbourhoods(x), expected)
