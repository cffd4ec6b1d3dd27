"""Tests for skad.datasets: MVTec-layout loaders and synthetic textures."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skad._textures import DEFECT_KINDS, _apply_defect
from skad.datasets import load_domains, load_mvtec, make_textures

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def make_fake_category(root, name="tile", size=(12, 10)):
    """A tiny MVTec-style category; ``size`` is (h, w) of test images."""
    h, w = size
    cat = root / name
    rng = np.random.default_rng(0)
    for i in range(3):
        _save(cat / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (h, w)))
    _save(cat / "test" / "good" / "000.png", rng.integers(0, 255, (h, w)))
    _save(cat / "test" / "good" / "001.JPG", rng.integers(0, 255, (h, w, 3)))
    (cat / "test" / "good" / "notes.txt").write_text("not an image")
    for stem in ("000", "001"):
        _save(cat / "test" / "crack" / f"{stem}.png", rng.integers(0, 255, (h, w)))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[2:5, 3:7] = 255
        _save(cat / "ground_truth" / "crack" / f"{stem}_mask.png", mask)
    return cat


def test_load_mvtec_test_split(tmp_path):
    make_fake_category(tmp_path)
    data = load_mvtec(tmp_path, "tile")
    names = [Path(p).relative_to(tmp_path / "tile" / "test").as_posix() for p in data.paths]
    assert names == ["crack/000.png", "crack/001.png", "good/000.png", "good/001.JPG"]
    assert data.y.tolist() == [1, 1, 0, 0]
    assert data.y.dtype.kind == "i"
    assert data.defect_types == ["crack", "crack", "good", "good"]
    assert data.mask_paths[0].endswith("ground_truth/crack/000_mask.png")
    assert data.mask_paths[2:] == [None, None]
    assert "masks" not in data


def test_load_mvtec_train_split(tmp_path):
    make_fake_category(tmp_path)
    data = load_mvtec(tmp_path, "tile", split="train")
    assert len(data.paths) == 3
    assert data.y.tolist() == [0, 0, 0]
    assert set(data.defect_types) == {"good"}


def test_load_mvtec_masks_native_size(tmp_path):
    make_fake_category(tmp_path, size=(12, 10))
    data = load_mvtec(tmp_path, "tile", return_masks=True)
    assert [m.shape for m in data.masks] == [(12, 10)] * 4
    assert all(m.dtype == np.uint8 for m in data.masks)
    expected = np.zeros((12, 10), dtype=np.uint8)
    expected[2:5, 3:7] = 1
    np.testing.assert_array_equal(data.masks[0], expected)
    assert not data.masks[2].any() and not data.masks[3].any()


@pytest.mark.parametrize("mask_size, shape", [(24, (24, 24)), ((6, 5), (6, 5))])
def test_load_mvtec_masks_resized(tmp_path, mask_size, shape):
    make_fake_category(tmp_path, size=(12, 10))
    data = load_mvtec(tmp_path, "tile", return_masks=True, mask_size=mask_size)
    assert [m.shape for m in data.masks] == [shape] * 4
    assert set(np.unique(data.masks[0]).tolist()) == {0, 1}  # nearest stays binary
    assert not data.masks[3].any()


def test_load_mvtec_errors(tmp_path):
    cat = make_fake_category(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_mvtec(tmp_path, "nope")
    with pytest.raises(ValueError, match="split"):
        load_mvtec(tmp_path, "tile", split="val")
    with pytest.raises(TypeError, match="mask_size"):
        load_mvtec(tmp_path, "tile", return_masks=True, mask_size="big")
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="001_mask.png"):
        load_mvtec(tmp_path, "tile")
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_mvtec(tmp_path, "empty", split="train")
    with pytest.raises(FileNotFoundError, match="split"):
        load_mvtec(tmp_path, "empty", split="test")


def test_load_domains(tmp_path):
    make_fake_category(tmp_path, "cloth", size=(8, 8))
    make_fake_category(tmp_path, "tile", size=(12, 10))
    (tmp_path / "stray_folder").mkdir()  # neither train/ nor test/: not a category
    data = load_domains(tmp_path, return_masks=True)
    assert data.groups.tolist() == ["cloth"] * 4 + ["tile"] * 4
    assert data.y.tolist() == [1, 1, 0, 0] * 2
    assert len(data.paths) == len(data.mask_paths) == len(data.defect_types) == 8
    assert data.masks[0].shape == (8, 8) and data.masks[4].shape == (12, 10)

    only = load_domains(tmp_path, "tile", split="train")
    assert only.groups.tolist() == ["tile"] * 3
    reordered = load_domains(tmp_path, ["tile", "cloth"])
    assert reordered.groups[0] == "tile"


def test_load_domains_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no category"):
        load_domains(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset root"):
        load_domains(tmp_path / "missing")
    make_fake_category(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        load_domains(tmp_path, [])


def test_make_textures_shapes_and_labels():
    data = make_textures(n_domains=3, n_normal=5, n_anomalous=4, image_size=32, random_state=0)
    n = 3 * 9
    assert data.images.shape == (n, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.masks.shape == (n, 32, 32) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks).tolist()) == {0, 1}
    assert data.y.tolist() == ([0] * 5 + [1] * 4) * 3
    assert len(set(data.groups.tolist())) == 3
    has_defect = data.masks.any(axis=(1, 2))
    np.testing.assert_array_equal(has_defect, data.y == 1)
    np.testing.assert_array_equal(data.defect_types == "good", data.y == 0)
    assert set(data.defect_types[data.y == 1]) <= set(DEFECT_KINDS)


def test_make_textures_determinism():
    a = make_textures(n_domains=2, n_normal=3, n_anomalous=3, random_state=7)
    b = make_textures(n_domains=2, n_normal=3, n_anomalous=3, random_state=7)
    c = make_textures(n_domains=2, n_normal=3, n_anomalous=3, random_state=8)
    for key in ("images", "masks", "defect_types", "groups"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a.images, c.images)


def test_make_textures_cycles_families_with_unique_names():
    data = make_textures(n_domains=7, n_normal=1, n_anomalous=0, image_size=16, random_state=0)
    names = data.groups.tolist()
    assert len(set(names)) == 7
    assert "stripes_1" in names and "checker_1" in names
    assert not data.masks.any()


def test_make_textures_normal_images_vary_within_domain():
    data = make_textures(n_domains=5, n_normal=2, n_anomalous=0, random_state=0)
    for i in range(0, 10, 2):
        assert not np.array_equal(data.images[i], data.images[i + 1])


def test_make_textures_defect_subset():
    data = make_textures(n_domains=1, n_normal=0, n_anomalous=6, defects=("spot",), random_state=1)
    assert set(data.defect_types) == {"spot"}
    with pytest.raises(ValueError, match="'dent'"):
        make_textures(defects=("spot", "dent"))
    with pytest.raises(ValueError, match="image_size"):
        make_textures(image_size=8)
    with pytest.raises(TypeError, match="n_domains"):
        make_textures(n_domains=2.5)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_masks_cover_changed_pixels_exactly(kind):
    rng = np.random.default_rng(0)
    for _ in range(10):
        image = rng.uniform(0.05, 0.95, size=(32, 32, 3))
        out, mask = _apply_defect(image, kind, rng)
        changed = (np.round(out * 255) != np.round(image * 255)).any(axis=-1)
        np.testing.assert_array_equal(changed, mask)


def test_defects_are_visible():
    # Mean colour change inside a mask is well above the sensor noise (0.02).
    rng = np.random.default_rng(0)
    for kind in DEFECT_KINDS:
        image = rng.uniform(0.05, 0.95, size=(64, 64, 3))
        out, mask = _apply_defect(image, kind, rng)
        assert np.abs(out - image)[mask].max(axis=-1).mean() > 0.1


@pytest.mark.skipif(not (SHARED_DATA / "aitex_00").is_dir(), reason="shared data absent")
def test_load_real_mvtec_folder():
    data = load_mvtec(SHARED_DATA, "aitex_00")
    assert len(data.paths) == len(data.y) > 0
    assert data.y.sum() > 0 and (data.y == 0).sum() > 0
    masks = load_mvtec(SHARED_DATA, "aitex_00", return_masks=True).masks
    assert all(masks[i].any() for i in np.flatnonzero(data.y))
    assert not any(masks[i].any() for i in np.flatnonzero(data.y == 0))
    small = load_mvtec(SHARED_DATA, "aitex_00", return_masks=True, mask_size=32).masks
    assert all(m.shape == (32, 32) for m in small)


# ------------------------------------------------------- what a folder holds
DEBRIS_FOLDERS = [".ipynb_checkpoints", "__MACOSX", "@eaDir", "$RECYCLE.BIN",
                  "System Volume Information", ".hidden"]
DEBRIS_FILES = ["._000.png", ".DS_Store", "Thumbs.db", "desktop.ini", "~$000.png", ".x.png"]


def _litter(folder):
    """Put the debris of notebooks, macOS, Windows and NAS boxes in ``folder``."""
    for name in DEBRIS_FOLDERS:
        _save(folder / name / "000.png", np.zeros((4, 4)))
    for name in DEBRIS_FILES:
        (folder / name).write_bytes(b"\x00\x05\x16\x07 not an image")


def test_debris_is_never_an_image_a_defect_type_or_a_category(tmp_path, caplog):
    clean = tmp_path / "clean"
    make_fake_category(clean, "cloth")
    make_fake_category(clean, "tile")
    expected = {split: load_domains(clean, split=split) for split in ("train", "test")}
    litter = tmp_path / "litter"
    cats = [make_fake_category(litter, "cloth"), make_fake_category(litter, "tile")]
    _litter(litter)
    for cat in cats:
        for folder in (cat, cat / "test", cat / "test" / "good", cat / "test" / "crack",
                       cat / "train" / "good", cat / "ground_truth"):
            _litter(folder)
    # a notebook's copy of a whole category is not a category either
    make_fake_category(litter / ".ipynb_checkpoints", "tile")
    with caplog.at_level("INFO", logger="skad"):
        for split in ("train", "test"):
            data = load_domains(litter, split=split, return_masks=split == "test")
            got = [Path(p).relative_to(litter) for p in data.paths]
            assert got == [Path(p).relative_to(clean) for p in expected[split].paths]
            assert data.defect_types == expected[split].defect_types
    assert "__MACOSX" in caplog.text and "._000.png" in caplog.text


def test_masks_any_nonzero_pixel_is_a_defect(tmp_path):
    cat = make_fake_category(tmp_path, size=(12, 10))
    expected = np.zeros((12, 10), dtype=np.uint8)
    expected[2:5, 3:7] = 1
    gt = cat / "ground_truth" / "crack"
    palette = Image.fromarray(expected * 2, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 0, 0, 0, 200, 30, 30])
    masks = {
        "class 2": Image.fromarray(expected * 2),
        "class 3 and 8": Image.fromarray(np.where(expected, np.arange(10) % 2 * 5 + 3, 0)
                                         .astype(np.uint8)),
        "bilevel": Image.fromarray(expected.astype(bool)),
        "16-bit": Image.fromarray(expected.astype(np.uint16) * 7),
        "palette": palette,
        "red on black": Image.fromarray(np.stack([expected * 255, 0 * expected,
                                                  0 * expected], axis=-1)),
    }
    for kind, mask in masks.items():
        mask.save(gt / "000_mask.png")
        data = load_mvtec(tmp_path, "tile", return_masks=True)
        np.testing.assert_array_equal(data.masks[0], expected, err_msg=kind)


def test_masks_follow_their_images_orientation(tmp_path):
    cat = make_fake_category(tmp_path, size=(12, 10))
    stored = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: 64 wide, 96 high
    (cat / "test" / "crack" / "000.png").unlink()
    Image.fromarray(stored).save(cat / "test" / "crack" / "000.jpg", exif=exif)
    shown = np.zeros((96, 64), dtype=np.uint8)
    shown[80:90, 5:20] = 255
    _save(cat / "ground_truth" / "crack" / "000_mask.png", shown)
    data = load_mvtec(tmp_path, "tile", return_masks=True)
    np.testing.assert_array_equal(data.masks[0], shown // 255)
    small = load_mvtec(tmp_path, "tile", return_masks=True, mask_size=(48, 32))
    assert small.masks[0].shape == (48, 32) and small.masks[0][40:45, 3:10].all()
    # a mask of the stored, unturned size is refused, naming both files, even when resizing
    _save(cat / "ground_truth" / "crack" / "000_mask.png", np.rot90(shown))
    for mask_size in (None, 32):
        with pytest.raises(ValueError, match=r"000_mask\.png is 96 x 64 .*000\.jpg is 64 x 96"):
            load_mvtec(tmp_path, "tile", return_masks=True, mask_size=mask_size)
    # and so is any other size: never silently stretched
    _save(cat / "ground_truth" / "crack" / "000_mask.png", shown)
    _save(cat / "ground_truth" / "crack" / "001_mask.png", np.zeros((6, 5)))
    with pytest.raises(ValueError, match=r"001_mask\.png is 5 x 6 .*001\.png is 10 x 12"):
        load_mvtec(tmp_path, "tile", return_masks=True, mask_size=32)
