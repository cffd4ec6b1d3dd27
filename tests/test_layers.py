"""The generic layers of skad._layers, and fitted detectors pickled before they moved there."""

import importlib
import pickle

import pytest
import torch
import torch.nn.functional as F

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


# ------------------------------------------------------------------ conv2d
@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="PyTorch without NNPACK")
@pytest.mark.parametrize("shape, out_channels, padding", [
    ((5, 32, 24, 24), 64, 1), ((3, 64, 12, 12), 128, 1), ((2, 128, 6, 6), 128, 1),
    ((4, 64, 7, 9), 64, 0),  # unpadded, odd sizes
])
def test_conv2d_takes_winograd_on_one_thread_and_agrees(shape, out_channels, padding,
                                                         one_thread, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(out_channels, shape[1], 3, 3, generator=g), torch.randn(out_channels)
    calls = []
    winograd = layers._winograd
    monkeypatch.setattr(layers, "_winograd", lambda *a: calls.append(len(a[0])) or winograd(*a))
    monkeypatch.setattr(layers, "_WINOGRAD_BLOCK", x[0].numel() * 2)  # blocks of two rows
    with torch.no_grad():
        out, expected = layers.conv2d(x, weight, bias, 1, padding), F.conv2d(x, weight, bias, 1,
                                                                              padding)
        assert calls == [2] * (shape[0] // 2) + [1] * (shape[0] % 2)
        assert out.shape == expected.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-4 * expected.abs().max())
        calls.clear()
        torch.testing.assert_close(layers.conv2d(x, weight, None, 1, padding),  # no bias
                                   F.conv2d(x, weight, None, 1, padding), rtol=0,
                                   atol=1e-4 * expected.abs().max())
        assert calls


@pytest.mark.parametrize("case", ["gradients", "stride 2", "16 input channels", "two threads",
                                  "5 x 5 kernel"])
def test_conv2d_is_f_conv2d_elsewhere(case, one_thread, monkeypatch):
    g = torch.Generator().manual_seed(0)
    in_channels = 16 if case == "16 input channels" else 64
    k = 5 if case == "5 x 5 kernel" else 3
    x = torch.randn(2, in_channels, 12, 12, generator=g)
    weight = torch.randn(64, in_channels, k, k, generator=g)
    stride = 2 if case == "stride 2" else 1
    if case == "two threads":
        torch.set_num_threads(2)
    monkeypatch.setattr(layers, "_winograd", None)  # would fail if called
    with torch.set_grad_enabled(case == "gradients"):
        assert torch.equal(layers.conv2d(x, weight, None, stride, 1),
                           F.conv2d(x, weight, None, stride, 1))


# ------------------------------------------------------------------ max_pool2x2
@pytest.mark.parametrize("shape, layout", [
    ((3, 64, 24, 24), "nchw"), ((2, 16, 7, 9), "nchw"),  # odd sides keep their last row/column
    ((4, 1, 5, 6), "nchw"), ((2, 32, 11, 12), "channels_last"), ((2, 8, 6, 6), "strided"),
])
def test_max_pool2x2_is_ceil_mode_max_pooling(shape, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    x[0, 0, -1, -1] = float("nan")  # propagates in both
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], generator=g)[..., ::2]
    with torch.no_grad():
        out = layers.max_pool2x2(x)
    expected = F.max_pool2d(x, 2, ceil_mode=True)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


def test_max_pool2x2_with_gradients_is_torch_max_pooling(monkeypatch):
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    monkeypatch.setattr(torch, "maximum", None)  # would fail if called
    out = layers.max_pool2x2(x)
    out.sum().backward()
    assert x.grad.sum() == out.numel()  # one gradient per window, as F.max_pool2d's
