"""Image input: the forms of X, validation messages, lazy reading, resizing."""

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from skad._images import check_images, check_labels, iter_batches
from skad._maps import gaussian_blur, resize_maps


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
    # the lists in one-dimensional arrays: of str, of Path objects, of arrays
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for array in (np.array([str(p) for p in paths]), np.array(paths, dtype=object)):
        as_array = check_images(array)
        np.testing.assert_array_equal(as_array.read(1), from_files.read(1))
    ragged = np.empty(2, dtype=object)
    ragged[:] = [rgb[0], rgb[1, :5, :7, :1]]
    assert check_images(ragged).sizes() == [(10, 12), (5, 7)]


@pytest.mark.parametrize("X, error, match", [
    (np.zeros((4, 4)), ValueError, "For one image use X\\[None\\]"),
    (np.zeros(4), ValueError, "For one image use X\\[None\\]"),
    (np.array(["a.png", "nope.png"]), ValueError, r"X\[0\].*a.png.*does not exist"),
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


# ------------------------------------------------------------- pixel values by mode
def _read_file_as(tmp_path, name, image, **save):
    path = tmp_path / name
    image.save(path, **save)
    return check_images([path]).read(0)


def test_sixteen_bit_files_and_arrays_read_by_type_not_content(tmp_path):
    # one scene at two exposures: B = 1.2 A must read 1.2 times as bright, not 200 times darker
    a = np.linspace(0, 250, 48).reshape(6, 8).astype(np.uint16)
    b = (a * 1.2).astype(np.uint16)
    for ext in ("png", "tif"):
        ra = _read_file_as(tmp_path, f"a.{ext}", Image.fromarray(a))[..., 0]
        rb = _read_file_as(tmp_path, f"b.{ext}", Image.fromarray(b))[..., 0]
        np.testing.assert_allclose(ra, a / 65535, atol=1e-7)
        np.testing.assert_allclose(rb, b / 65535, atol=1e-7)
    # an in-memory uint16 array reads as the file does
    np.testing.assert_allclose(check_images(b[None]).read(0)[..., 0], rb, atol=1e-7)
    path = tmp_path / "c.pgm"  # Pillow reads 16-bit PGM as 32-bit "I", rescaled to 16 bits
    Image.fromarray(b).save(path)
    np.testing.assert_allclose(check_images([path]).read(0)[..., 0], rb, atol=1e-7)


@pytest.mark.parametrize("mode, value, expected", [
    ("1", 1, (1.0, 1.0, 1.0)),
    ("L", 51, (0.2, 0.2, 0.2)),
    ("LA", (51, 0), (0.2, 0.2, 0.2)),              # alpha dropped, grey kept
    ("RGB", (255, 51, 0), (1.0, 0.2, 0.0)),
    ("RGBA", (255, 51, 0, 10), (1.0, 0.2, 0.0)),   # alpha dropped, colour not blended
    ("I;16", 13107, (0.2, 0.2, 0.2)),
])
def test_png_modes(tmp_path, mode, value, expected):
    out = _read_file_as(tmp_path, "x.png", Image.new(mode, (5, 3), value))
    assert out.shape == (3, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[1, 2], expected, atol=1e-6)


def test_palettes_read_as_their_colours(tmp_path):
    palette = [0, 0, 0, 255, 51, 0]
    im = Image.new("P", (4, 4), 1)
    im.putpalette(palette)
    for name in ("p.png", "p.gif", "p.bmp"):
        np.testing.assert_allclose(_read_file_as(tmp_path, name, im)[0, 0], (1.0, 0.2, 0.0))
    im.info["transparency"] = bytes([255, 0])  # transparent index: colour kept, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(_read_file_as(tmp_path, "pt.png", im)[0, 0], (1.0, 0.2, 0.0))


@pytest.mark.parametrize("mode, value", [("CMYK", (0, 204, 255, 0)), ("LAB", None)])
def test_other_colour_spaces_become_rgb(tmp_path, mode, value):
    rgb = Image.new("RGB", (4, 4), (255, 51, 0))
    im = rgb.convert(mode) if value is None else Image.new(mode, (4, 4), value)
    out = _read_file_as(tmp_path, "x.tif", im)
    np.testing.assert_allclose(out[0, 0], (1.0, 0.2, 0.0), atol=0.03)  # 8-bit LAB round trip


def test_tiff_integers_read_at_their_declared_depth(tmp_path):
    values = np.array([[0, 100, 2**31 - 1]], dtype=np.int32)  # Pillow writes signed 32-bit
    out = _read_file_as(tmp_path, "i32.tif", Image.fromarray(values))
    np.testing.assert_allclose(out[0, :, 0], values[0] / (2**31 - 1), rtol=1e-6)
    Image.fromarray(values - 5).save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"neg\.tif.*negative values \(down to -5\)"):
        check_images([tmp_path / "neg.tif"]).read(0)


@pytest.mark.parametrize("dtype, bits, full", [
    (np.uint8, 8, 255), (np.int8, 8, 127), (np.uint16, 16, 65535), (np.uint16, 12, 4095),
    (np.int16, 16, 32767), (np.uint32, 32, 2**32 - 1), (np.int32, 32, 2**31 - 1),
])
def test_tiff_sample_formats(tmp_path, dtype, bits, full):
    tifffile = pytest.importorskip("tifffile")
    top = np.iinfo(dtype).max if bits == 8 * np.dtype(dtype).itemsize else full
    values = np.array([[0, 3, top // 2, top]], dtype=dtype)
    tifffile.imwrite(tmp_path / "x.tif", values, bitspersample=bits)
    out = check_images([tmp_path / "x.tif"]).read(0)
    np.testing.assert_allclose(out[0, :, 0], values[0] / full, rtol=1e-6)


@pytest.mark.parametrize("compression", [None, "lzw"])
def test_white_is_zero_tiffs_read_as_displayed_at_every_depth(tmp_path, compression):
    # TIFF PhotometricInterpretation 0 (0 is white): Pillow turns 8-bit samples around
    # but keeps 16-bit and float ones as stored
    tifffile = pytest.importorskip("tifffile")
    shown = np.array([[1.0, 0.2, 0.0]])  # white, dark grey, black
    for name, stored in [("u8.tif", np.round(255 * (1 - shown)).astype(np.uint8)),
                         ("u16.tif", np.round(65535 * (1 - shown)).astype(np.uint16)),
                         ("f32.tif", (1 - shown).astype(np.float32))]:
        tifffile.imwrite(tmp_path / name, stored, photometric="miniswhite",
                         compression=compression)
        out = check_images([tmp_path / name]).read(0)
        np.testing.assert_allclose(out[0, :, 0], shown[0], atol=1e-6, err_msg=name)


def test_float_files_must_lie_in_unit_range(tmp_path):
    values = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        _read_file_as(tmp_path, "f.tif", Image.fromarray(values))[0, :, 0], values[0])
    Image.fromarray(values * 4095).save(tmp_path / "raw.tif")
    with pytest.raises(ValueError, match=r"raw\.tif.*\[0, 4.1e\+03\].*divide by"):
        check_images([tmp_path / "raw.tif"]).read(0)
    Image.fromarray(np.full((2, 2), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif.*NaN"):
        check_images([tmp_path / "nan.tif"]).read(0)


@pytest.mark.parametrize("value, shown", [(1 + 2**-23, "1.0000001192092896"),
                                          (-2**-30, "-9.31e-10"), (1.5, "1.5")])
def test_values_out_of_range_are_shown_out_of_range(value, shown):
    # the overshoot of a resampling filter, say: never reported as "values in [0.5, 1]"
    X = np.array([[[0.5, value]]], np.float32)
    with pytest.raises(ValueError, match=rf"values in \[[^]]*{re.escape(shown)}[^]]*\]"):
        check_images(X)


def test_integers_of_unknown_depth_are_refused(tmp_path, monkeypatch):
    import skad._images

    # as a 32-bit integer file of a format that declares no bit depth (FITS, IM, ...)
    monkeypatch.setattr(skad._images, "_declared_depth", lambda im: None)
    Image.new("I", (4, 4), 7).save(tmp_path / "x.tif")
    with pytest.raises(ValueError, match=r"x\.tif.*32-bit integer samples without a declared"):
        check_images([tmp_path / "x.tif"]).read(0)


def test_multi_frame_files_read_their_first_frame(tmp_path):
    frames = [Image.new("L", (4, 4), v) for v in (51, 200)]
    for name in ("x.tif", "x.gif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        np.testing.assert_allclose(check_images([tmp_path / name]).read(0), 0.2)


@pytest.mark.parametrize("array, expected", [
    (np.array([[0, 65535]], np.uint16), [0.0, 1.0]),
    (np.array([[0, 65535]], ">u2"), [0.0, 1.0]),  # big-endian, as FITS and raw dumps hold it
    (np.array([[False, True]]), [0.0, 1.0]),
    (np.array([[0, 255]], np.uint8), [0.0, 1.0]),
    (np.array([[0.0, 0.5]], np.float16), [0.0, 0.5]),
])
def test_arrays_read_by_dtype(array, expected):
    for X in (array[None], [array]):
        np.testing.assert_allclose(check_images(X).read(0)[0, :, 0], expected)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int16, np.uint32, np.complex64,
                                   object])
def test_arrays_of_no_fixed_range_are_refused(dtype):
    X = [np.zeros((4, 4), np.uint8), np.zeros((4, 4), dtype)]
    with pytest.raises(TypeError, match=rf"X\[1\] has dtype {np.dtype(dtype)}.*X.astype"):
        check_images(X)


# ------------------------------------------------------------------- orientation
def _oriented(tmp_path, name, array, orientation):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(array).save(tmp_path / name, exif=exif)
    return tmp_path / name


@pytest.mark.parametrize("orientation, turn", [
    (1, lambda a: a), (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
    (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1]),
    (5, lambda a: np.swapaxes(a, 0, 1)),
])
@pytest.mark.parametrize("ext", ["png", "jpg", "tif"])
def test_images_are_read_as_displayed(tmp_path, orientation, turn, ext):
    # a smooth, asymmetric picture, 64 high and 96 wide as stored
    yy, xx = np.mgrid[0:64, 0:96]
    stored = np.stack([xx * 2, yy * 3, xx + yy], axis=-1).astype(np.uint8)
    path = _oriented(tmp_path, f"x.{ext}", stored, orientation)
    shown = turn(stored) / 255
    images = check_images([path])
    assert images.size(0) == shown.shape[:2]  # from the header, before any read
    out = images.read(0)
    assert out.shape == shown.shape and images.size(0) == shown.shape[:2]
    np.testing.assert_allclose(out, shown, atol=0.05 if ext == "jpg" else 1e-6)


@pytest.mark.parametrize("mode", ["L", "I;16", "P", "RGBA", "CMYK"])
@pytest.mark.parametrize("orientation, turn", [
    (5, lambda a: np.swapaxes(a, 0, 1)), (6, lambda a: np.rot90(a, -1)),
    (7, lambda a: np.rot90(a, 2).swapaxes(0, 1)), (8, lambda a: np.rot90(a, 1)),
])
def test_uncompressed_tiffs_turned_a_quarter_are_read_as_displayed(tmp_path, mode, orientation,
                                                                    turn):
    # Pillow memory-maps these files at the turned size: unturned, scrambled pixels
    yy, xx = np.mgrid[0:16, 0:24]
    grey = (xx * 10 + yy).astype(np.uint8)
    stored = Image.fromarray(grey.astype(np.uint16) * 257 if mode == "I;16" else grey)
    if mode != "I;16":
        stored = stored.convert(mode)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / "x.tif"
    stored.save(path, exif=exif)  # uncompressed, one strip
    expected = turn(np.asarray(stored.convert("RGB") if mode != "I;16" else grey)) / 255
    images = check_images([path])
    assert images.size(0) == (24, 16)
    out = images.read(0)
    assert out.shape[:2] == (24, 16) and images.size(0) == (24, 16)
    np.testing.assert_allclose(out if expected.ndim == 3 else out[..., 0], expected, atol=1e-6)


def test_digests_are_kept_only_when_asked_and_tell_the_same_pixels(tmp_path):
    """An ImageSet keeps no digest unless asked (scoring millions of images would hold
    them all); asked, a file and the array it decodes to get the same one, and a subset's
    reads are recorded for the set it was taken from."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    Image.fromarray(arrays[0]).save(tmp_path / "a.png")
    files = check_images([str(tmp_path / "a.png"), arrays[1]])
    files.read(0)
    assert files.read_digests() == set() and files._digests is None
    files.record_digests()
    sub = files.subset([1])
    sub.read(0)
    files.read(0)
    same = check_images([arrays[0], arrays[2]]).record_digests()
    same.read(0), same.read(1)
    assert len(files.read_digests()) == 2 and len(sub.read_digests()) == 1
    assert sub.read_digests() < files.read_digests()
    assert len(files.read_digests() & same.read_digests()) == 1  # a.png is arrays[0]
    assert not sub.read_digests() & same.read_digests()  # arrays[1]: in neither of same


def _aspect_warnings(det, X):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det.fit(X)
    return [str(w.message) for w in caught if "height-to-width" in str(w.message)]


@pytest.mark.parametrize("method", ["PatchCore", "MMR"])
def test_fit_warns_of_images_squashed_by_their_resize(tmp_path, method):
    """Resizing changes what the images show; fit says so before training, for files
    (sizes from their headers) and arrays alike, with a size that keeps the ratio."""
    import skad

    kwargs = ({"backbone": "test_resnet", "weights": None} if method == "PatchCore" else
              {"teacher": "test_efficientnet", "teacher_weights": None, "student": "test_vit",
               "student_weights": None, "student_depth": 1, "n_epochs": 1,
               "standardize_positions": False})
    det = getattr(skad, method)(image_size=32, random_state=0, **kwargs)
    rng = np.random.default_rng(0)
    tall = [rng.random((100, 40, 3)) for _ in range(3)]  # 2.5 : 1
    msg, = _aspect_warnings(det, tall)
    assert "3 of 3 training images" in msg and "X[0] is 100 x 40 (height x width)" in msg
    assert "image_size=32" in msg and "e.g. (96, 32)" in msg  # 32 * 2.5 = 80 -> 96

    paths = []
    for i, (h, w) in enumerate([(40, 100), (40, 110), (40, 90)]):  # wide ones
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((h, w, 3), 40 * i + 20, np.uint8)).save(paths[-1])
    msg, = _aspect_warnings(det, paths)
    assert "3 of 3 training images" in msg and "1.png" in msg and "40 x 110" in msg
    assert "e.g. (32, 64)" in msg  # 32 x 80 at their middle ratio, the width to 32's multiple
    assert not _aspect_warnings(det.set_params(image_size=(32, 64)), paths)
    det.set_params(image_size=32)

    both = [rng.random((100, 40, 3)), rng.random((40, 100, 3)), rng.random((40, 40, 3))]
    msg, = _aspect_warnings(det, both)
    assert "span 0.40 to 2.50" in msg and "turn them to one orientation" in msg
    assert "image_size is already the pair" in msg and "e.g." not in msg

    # one orientation, ratios too far apart for any pair: the pair that distorts the worst
    # least, which, passed back, is not answered with another pair (no advice in a circle)
    spread = [rng.random((100, 40, 3)), rng.random((40, 40, 3)), rng.random((60, 40, 3))]
    msg, = _aspect_warnings(det.set_params(image_size=32), spread)
    assert "span 1.00 to 2.50" in msg and "orientation" not in msg
    assert "least (at most 2.0 times) is e.g. (64, 32)" in msg
    msg, = _aspect_warnings(det.set_params(image_size=(64, 32)), spread)
    assert "image_size is already the pair" in msg and "(at most 2.0 times)" in msg
    assert "e.g." not in msg
    det.set_params(image_size=32)

    # within 1.5 times, or a pair in their ratio: no warning
    assert not _aspect_warnings(det, [rng.random((56, 40, 3)) for _ in range(3)])
    assert not _aspect_warnings(det.set_params(image_size=(80, 32)), tall)


def test_the_squash_warning_comes_before_the_training(monkeypatch):
    from skad import PatchCore

    det = PatchCore(backbone="test_resnet", weights=None, image_size=32)

    def training(*args):
        raise RuntimeError("training started")

    monkeypatch.setattr(det, "_fit", training)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError):
        warnings.simplefilter("always")
        det.fit([np.random.default_rng(0).random((100, 40, 3)) for _ in range(3)])
    assert any("height-to-width" in str(w.message) for w in caught)


def test_watching_for_digests_notes_only_the_images_looked_for(tmp_path):
    """Scoring looks for its references among millions of images: the ones found, by index,
    and nothing kept of the others."""
    from skad._images import pixel_digest

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(4)]
    Image.fromarray(arrays[2]).save(tmp_path / "c.png")
    images = check_images([arrays[0], arrays[1], tmp_path / "c.png", arrays[3]])
    images.watch_for([pixel_digest(arrays[2]), pixel_digest(arrays[3])])
    for i in range(3):
        images.read(i)
    assert images.found() == [2]  # the file, by its decoded pixels; arrays[3] not read yet
    images.read(3)
    assert images.found() == [2, 3] and images._digests is None
    assert images.subset([3, 1]).found() == [0]
