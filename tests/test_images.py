"""Image input: the forms of X, validation messages, lazy reading, resizing."""

import numpy as np
import pytest
import torch
from PIL import Image

from skad._images import (check_images, check_labels, gaussian_blur, iter_batches,
                          resize_maps)


def test_forms_read_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb[0]).save(tmp_path / "a.png")
    Image.fromarray(rgb[1, :, :, 0]).save(tmp_path / "b.png")  # grayscale file
    from_files = check_images([tmp_path / "a.png", str(tmp_path / "b.png")])
    np.testing.assert_allclose(from_files.read(0), rgb[0] / 255, atol=1e-6)
    grey = from_files.read(1)
    assert grey.shape == (10, 12, 3) and np.allclose(grey[..., 0], grey[..., 2])
    assert from_files.size(1) == (10, 12)
    floats = check_images(rgb.astype(np.float32) / 255)
    np.testing.assert_allclose(floats.read(1), rgb[1] / 255, atol=1e-6)
    mixed = check_images([rgb[0], rgb[1, :5, :7, :1]])
    assert mixed.sizes() == [(10, 12), (5, 7)]
    rgba = check_images([np.zeros((4, 4, 4), np.uint8)])
    assert rgba.read(0).shape == (4, 4, 3)


@pytest.mark.parametrize("X, error, match", [
    (np.zeros((4, 4)), ValueError, "For one image use X\\[None\\]"),
    (np.zeros((0, 4, 4)), ValueError, "empty"),
    ([], ValueError, "empty"),
    (np.zeros((1, 4, 4, 2)), ValueError, "1, 3 or 4 channels"),
    (np.full((2, 4, 4), 2.0), ValueError, r"X\[0\].*\[0, 1\]"),
    (np.zeros((2, 4, 4), np.int32), TypeError, "uint8"),
    ([np.zeros((4, 4)), np.zeros((4, 4, 4, 1))], ValueError, r"X\[1\]"),
    ([np.zeros((4, 4)), "nope.png"], ValueError, r"X\[1\].*nope.png.*does not exist"),
    ("folder/", TypeError, "list of image paths"),
    (42, TypeError, "ndarray"),
])
def test_bad_input_names_the_item(X, error, match):
    with pytest.raises(error, match=match):
        check_images(X)


def test_nan_and_corrupt_file(tmp_path):
    X = np.zeros((3, 4, 4), np.float64)
    X[2, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"X\[2\] contains NaN or infinite"):
        check_images(X)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    images = check_images([tmp_path / "bad.png"])  # exists: checked lazily
    with pytest.raises(ValueError, match="cannot read image file.*bad.png"):
        images.read(0)


def test_labels():
    assert check_labels([0, 1, 1.0], 3).dtype == np.int64
    with pytest.raises(ValueError, match="3 labels but X has 2"):
        check_labels([0, 1, 0], 2)
    with pytest.raises(ValueError, match=r"\['2'\]"):
        check_labels([0, 2], 2)
    with pytest.raises(ValueError, match="0 \\(normal\\)"):
        check_labels(["a", "b"], 2)


def test_batches_are_lazy_and_resized():
    class Counting(list):
        reads = 0

    X = [np.full((8 + i, 6, 3), i * 20, np.uint8) for i in range(5)]
    images = check_images(X)
    seen = []
    for idx, batch in iter_batches(images, 2, 16):
        assert batch.shape == (len(idx), 3, 16, 16) and batch.dtype == torch.float32
        seen.extend(idx.tolist())
    assert seen == [0, 1, 2, 3, 4]


def test_resize_maps_and_blur():
    maps = torch.zeros(2, 8, 8)
    maps[:, 4, 4] = 1
    out = resize_maps(maps, [(8, 8), (16, 4)])
    assert out[0].shape == (8, 8) and out[1].shape == (16, 4)
    from scipy.ndimage import gaussian_filter

    rand = torch.rand(2, 20, 24)
    # scipy's default ("reflect") borders and radius, and a radius given (GeneralAD's)
    for sigma, radius in ((1.5, None), (4.0, None), (3.0, 4)):
        blurred = gaussian_blur(rand, sigma, radius)
        expected = np.stack([gaussian_filter(m, sigma, radius=radius)
                             for m in rand.numpy().astype(np.float64)])
        np.testing.assert_allclose(blurred.numpy(), expected, atol=1e-5)
