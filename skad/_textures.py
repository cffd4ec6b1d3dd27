"""Procedural textures and synthetic defects behind :func:`skad.datasets.make_textures`,
and the synthetic anomalies MetaComparer trains on (:func:`synthetic_anomalies`).

Images are built as float RGB arrays in [0, 1] and converted to uint8 at the
end. Normal texture values are kept inside [0.05, 0.95] so that every defect,
which blends pixels towards a colour at least 0.05 away or shifts them by at
least 0.15, changes every pixel it covers by several grey levels: the
returned mask is then exactly the set of changed pixels.
"""

import numpy as np
from scipy import ndimage

DEFECT_KINDS = ("scratch", "spot", "cut", "colour")
FAMILIES = ("stripes", "checker", "stone", "dots", "wood")

_LOW, _HIGH = 0.05, 0.95


# --------------------------------------------------------------------------
# Texture families: each maps (domain params, per-image rng, grid) to a
# float field in roughly [0, 1]; colours are applied afterwards.
# --------------------------------------------------------------------------


def _grid(size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def _stripes_params(rng, size):
    return {"period": rng.uniform(5, 12), "angle": rng.uniform(0, np.pi)}


def _stripes(p, rng, yy, xx):
    angle = p["angle"] + rng.normal(0, 0.03)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    return 0.5 + 0.5 * np.sin(2 * np.pi * u / p["period"] + rng.uniform(0, 2 * np.pi))


def _checker_params(rng, size):
    return {"period": rng.uniform(8, 16), "sharpness": rng.uniform(2, 6)}


def _checker(p, rng, yy, xx):
    phase_y, phase_x = rng.uniform(0, 2 * np.pi, size=2)
    w = 2 * np.pi / p["period"]
    weave = np.sin(w * yy + phase_y) * np.sin(w * xx + phase_x)
    return 0.5 + 0.5 * np.tanh(p["sharpness"] * weave) / np.tanh(p["sharpness"])


def _stone_params(rng, size):
    return {"sigma": rng.uniform(1.2, 3.0)}


def _stone(p, rng, yy, xx):
    field = ndimage.gaussian_filter(rng.normal(size=yy.shape), p["sigma"], mode="wrap")
    return 0.5 + 0.2 * field / field.std()


def _dots_params(rng, size):
    period = rng.uniform(7, 12)
    return {
        "period": period,
        "radius": period * rng.uniform(0.2, 0.35),
        "angle": rng.uniform(0, np.pi / 2),
    }


def _dots(p, rng, yy, xx):
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    offset = rng.uniform(0, p["period"], size=2)
    u = (xx * c + yy * s + offset[0]) % p["period"] - p["period"] / 2
    v = (-xx * s + yy * c + offset[1]) % p["period"] - p["period"] / 2
    return 1 / (1 + np.exp(-2.0 * (p["radius"] - np.hypot(u, v))))


def _wood_params(rng, size):
    return {
        "period": rng.uniform(4, 9),
        "centre": rng.uniform(-1.5, 2.5, size=2) * size,
        "aspect": rng.uniform(0.3, 1.0),
        "warp": rng.uniform(0.5, 2.0),
    }


def _wood(p, rng, yy, xx):
    cy, cx = p["centre"] + rng.normal(0, 1.5, size=2)
    warp = ndimage.gaussian_filter(rng.normal(size=yy.shape), 4, mode="wrap")
    r = np.hypot(xx - cx, (yy - cy) * p["aspect"])
    return 0.5 + 0.5 * np.sin(2 * np.pi * r / p["period"] + p["warp"] * warp / warp.std())


_FAMILY_FUNCS = {
    "stripes": (_stripes_params, _stripes),
    "checker": (_checker_params, _checker),
    "stone": (_stone_params, _stone),
    "dots": (_dots_params, _dots),
    "wood": (_wood_params, _wood),
}


def _domain_colours(rng):
    """Two colours (dark, light) of one domain, with a random tint."""
    mid = rng.uniform(0.35, 0.65, size=3)
    contrast = rng.uniform(0.3, 0.5) * (0.7 + 0.3 * rng.random(3))
    return mid - contrast / 2, mid + contrast / 2


def _texture_image(family, params, colours, rng, size):
    """One normal float RGB image of a domain."""
    yy, xx = _grid(size)
    field = np.clip(_FAMILY_FUNCS[family][1](params, rng, yy, xx), 0, 1)
    dark, light = colours
    image = dark + field[..., None] * (light - dark)
    image += rng.uniform(-0.03, 0.03)  # small global brightness change
    image += rng.normal(0, 0.02, size=image.shape)  # sensor noise
    return np.clip(image, _LOW, _HIGH)


# --------------------------------------------------------------------------
# Defects: each returns a boolean mask; _apply_defect changes the pixels.
# --------------------------------------------------------------------------


def _segment_distance(yy, xx, p0, p1):
    """Distance to segment p0-p1 and position t in [0, 1] along it."""
    d = p1 - p0
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(d @ d, 1e-12)
    t = np.clip(t, 0, 1)
    return np.hypot(yy - p0[0] - t * d[0], xx - p0[1] - t * d[1]), t


def _random_segment(rng, size, min_frac, max_frac):
    length = rng.uniform(min_frac, max_frac) * size
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(0.25, 0.75, size=2) * size
    half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
    return centre - half, centre + half


def _scratch_mask(rng, size):
    yy, xx = _grid(size)
    p0, p1 = _random_segment(rng, size, 0.3, 0.7)
    dist, _ = _segment_distance(yy, xx, p0, p1)
    return dist <= rng.uniform(0.5, 1.0)  # 1-2 pixels wide


def cut_mask(rng, size):
    yy, xx = _grid(size)
    p0, p1 = _random_segment(rng, size, 0.2, 0.45)
    dist, t = _segment_distance(yy, xx, p0, p1)
    # A lens-shaped gash: widest in the middle, pointed at both ends.
    half_width = rng.uniform(1.2, 2.5) * max(size / 64, 1) * np.sqrt(1 - (2 * t - 1) ** 2)
    return dist <= np.maximum(half_width, 0.5)


def ellipse_mask(rng, size, min_frac, max_frac, wobble=0.0):
    yy, xx = _grid(size)
    ry, rx = np.maximum(rng.uniform(min_frac, max_frac, size=2) * size, 1.5)
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    # An optional wavy outline makes colour patches less regular.
    theta = np.arctan2(v, u)
    radius = 1 + wobble * np.sin(rng.integers(2, 4) * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= radius


def _defect_mask(kind, rng, size):
    if kind == "scratch":
        return _scratch_mask(rng, size)
    if kind == "cut":
        return cut_mask(rng, size)
    if kind == "spot":
        return ellipse_mask(rng, size, 0.04, 0.12)
    return ellipse_mask(rng, size, 0.08, 0.18, wobble=0.2)


def _apply_defect(image, kind, rng):
    """Draw one defect of ``kind`` on a float image; return (image, mask)."""
    size = image.shape[0]
    mask = _defect_mask(kind, rng, size)
    if not mask.any():  # cannot happen with the sizes above; guard anyway
        mask[size // 2, size // 2] = True
    out = image.copy()
    region = out[mask]
    if kind == "colour":
        # Hue change plus a brightness change; one channel moves >= 0.15.
        shift = rng.uniform(-0.15, 0.15, size=3) + rng.choice([-1, 1]) * 0.1
        strong = rng.integers(3)
        shift[strong] = np.sign(shift[strong] or 1) * max(abs(shift[strong]), 0.15)
        out[mask] = np.clip(region + shift, 0, 1)
    else:
        # Blend towards black or white; cuts are always dark.
        target = 0.0 if kind == "cut" or rng.random() < 0.5 else 1.0
        alpha = rng.uniform(0.75, 0.9) if kind == "cut" else rng.uniform(0.45, 0.8)
        out[mask] = (1 - alpha) * region + alpha * target
    return out, mask


# --------------------------------------------------------------------------
# Data set assembly
# --------------------------------------------------------------------------


def _check_count(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return int(value)


def _check_defects(defects, n_anomalous):
    defects = (defects,) if isinstance(defects, str) else tuple(defects)
    unknown = [d for d in defects if d not in DEFECT_KINDS]
    if unknown:
        raise ValueError(f"unknown defect kind {unknown[0]!r}; choose from {DEFECT_KINDS}.")
    if n_anomalous > 0 and not defects:
        raise ValueError("defects is empty but n_anomalous > 0.")
    return defects


def _domain_name(index):
    name = FAMILIES[index % len(FAMILIES)]
    cycle = index // len(FAMILIES)
    return name if cycle == 0 else f"{name}_{cycle}"


def make_texture_set(n_domains, n_normal, n_anomalous, image_size, defects, random_state):
    """Arrays behind :func:`skad.datasets.make_textures` (see its docstring)."""
    n_domains = _check_count(n_domains, "n_domains", 1)
    n_normal = _check_count(n_normal, "n_normal", 0)
    n_anomalous = _check_count(n_anomalous, "n_anomalous", 0)
    size = _check_count(image_size, "image_size", 16)
    if n_normal + n_anomalous == 0:
        raise ValueError("n_normal + n_anomalous must be at least 1.")
    defects = _check_defects(defects, n_anomalous)
    rng = np.random.default_rng(random_state)

    images, masks, groups, kinds = [], [], [], []
    for d in range(n_domains):
        family = FAMILIES[d % len(FAMILIES)]
        params = _FAMILY_FUNCS[family][0](rng, size)
        colours = _domain_colours(rng)
        # Every defect kind appears about equally often, in random order.
        domain_kinds = ["good"] * n_normal + list(
            rng.permutation([defects[i % len(defects)] for i in range(n_anomalous)])
        )
        for kind in domain_kinds:
            image = _texture_image(family, params, colours, rng, size)
            mask = np.zeros((size, size), dtype=bool)
            if kind != "good":
                image, mask = _apply_defect(image, kind, rng)
            images.append(image)
            masks.append(mask)
            kinds.append(str(kind))
            groups.append(_domain_name(d))

    kinds = np.array(kinds)
    return {
        "images": np.round(np.stack(images) * 255).astype(np.uint8),
        "y": (kinds != "good").astype(int),
        "groups": np.array(groups),
        "masks": np.stack(masks).astype(np.uint8),
        "defect_types": kinds,
    }


# --------------------------------------------------------------------------
# Synthetic anomalies on real images, for MetaComparer's domains without
# anomalous images (ours: the paper needs real ones).
# --------------------------------------------------------------------------


def synthesize_anomaly(image, donor, rng):
    """One synthetic defect on a float image ``(H, W, 3)``; returns ``(image, mask)``.

    Goes beyond the paper (which needs real anomalous images): a region of
    ``donor`` pasted in, a noise blob, or a scratch, chosen at random.
    """
    h, w = image.shape[:2]
    kind = rng.integers(3)
    mask = (cut_mask(rng, max(h, w)) if kind == 2
            else ellipse_mask(rng, max(h, w), 0.05, 0.15, wobble=0.3))[:h, :w]
    if not mask.any():
        mask[h // 2, w // 2] = True
    out = image.copy()
    if kind == 0:  # a patch of another image, shifted so that its content is unrelated
        shifted = np.roll(donor, (rng.integers(h), rng.integers(w)), axis=(0, 1))
        out[mask] = shifted[mask]
    elif kind == 1:  # a blob of noise, grey on grey images (a new hue would give it away)
        grey = np.allclose(image[..., :1], image[..., 1:])
        channels = 1 if grey else 3
        noise = rng.uniform(0, 1, channels) + rng.normal(0, 0.15, (int(mask.sum()), channels))
        alpha = rng.uniform(0.5, 0.9)
        out[mask] = (1 - alpha) * out[mask] + alpha * noise
    else:  # a dark or bright scratch
        alpha = rng.uniform(0.6, 0.9)
        out[mask] = (1 - alpha) * out[mask] + alpha * float(rng.random() < 0.5)
    return np.clip(out, 0, 1), mask


def synthetic_anomalies(read, bases, donors, rng):
    """One synthetic anomalous image per index of ``bases``, as uint8 ``(H, W, 3)`` arrays.

    ``read(i)`` gives image ``i`` as floats ``(H, W, 3)`` in [0, 1]; each defect
    (:func:`synthesize_anomaly`) takes its donor from ``donors`` (indices), other
    than the image itself where there is another.
    """
    arrays = []
    for b in bases:
        others = donors[donors != b]
        donor = read(rng.choice(others)) if len(others) else read(b)
        arrays.append(np.round(synthesize_anomaly(read(b), donor, rng)[0] * 255)
                      .astype(np.uint8))
    return arrays
