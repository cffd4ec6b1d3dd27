"""plot_maps: one column per image, rows for image, map and mask; saved when asked."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from skad.viz import plot_maps


def test_plot_maps_layout_and_file(tmp_path):
    images = [np.zeros((20, 30, 3), np.uint8), np.ones((16, 16))]  # mixed sizes and kinds
    maps = [np.random.rand(20, 30), np.random.rand(16, 16)]
    path = tmp_path / "maps.png"
    fig = plot_maps(images, maps, masks=[m > 0.5 for m in maps], path=path, scores=[1, 2])
    assert len(fig.axes) == 6 and path.stat().st_size > 0
    assert fig.axes[0].get_title() == "1"
    assert len(plot_maps(images, maps).axes) == 4  # no masks: two rows


def test_plot_maps_counts_must_agree():
    with pytest.raises(ValueError, match="2 images, 1 maps"):
        plot_maps(np.zeros((2, 8, 8)), [np.zeros((8, 8))])
