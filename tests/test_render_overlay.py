"""How heatmaps are drawn: the style per method kind, the sparse-map style, and the colour bars."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import convlens as cl
from convlens.heatmaps import METHODS, style_for
from convlens.render.overlay import (STYLES, colorbar_css, colorize, comparison_figure, describe_style,
                                     overlay_heatmap, saturate)

from conftest import TinyNet


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pixel_level_methods_are_drawn_alone_and_the_others_over_the_photo(name):
    method = METHODS[name]
    assert style_for(name) == ("map" if method.pixel_level else "blend")
    # every input-gradient method is pixel-level; a CAM or perturbation map is not
    assert method.pixel_level == (method.kind == "gradient")


def _sparse_map() -> torch.Tensor:
    """A saliency-like map: 2 % of pixels at 0.5, one at 1, the rest at 0.02."""
    heatmap = torch.full((20, 20), 0.02)
    heatmap.view(-1)[:8] = 0.5
    heatmap[10, 10] = 1.0
    return heatmap


def test_the_map_style_saturates_the_top_percent_on_black_and_hides_the_photo():
    photo = Image.new("RGB", (20, 20), (10, 200, 30))
    drawn = np.asarray(overlay_heatmap(photo, _sparse_map(), style="map"))
    top = float(np.percentile(_sparse_map().numpy(), 99))  # 0.5: the 8 bright pixels and the peak
    assert top == pytest.approx(0.5)
    assert tuple(drawn[0, 0]) == tuple(colorize(np.ones((1, 1)), "inferno")[0, 0])  # 0.5 / 0.5: full brightness
    assert tuple(drawn[10, 10]) == tuple(colorize(np.ones((1, 1)), "inferno")[0, 0])  # above it: saturated
    assert tuple(drawn[19, 19]) == tuple(colorize(np.full((1, 1), 0.02 / 0.5), "inferno")[0, 0])
    assert not (drawn == (10, 200, 30)).all(axis=-1).any()  # the photo does not show through
    # blended at 0.4 the same map barely tints the photo: the bright pixels differ from the background by
    # far less than drawn alone
    blended = np.asarray(overlay_heatmap(photo, _sparse_map(), style="blend")).astype(int)
    alone = drawn.astype(int)
    assert np.abs(alone[0, 0] - alone[19, 19]).sum() > 2 * np.abs(blended[0, 0] - blended[19, 19]).sum()


def test_saturate_never_divides_by_zero():
    assert saturate(np.zeros((4, 4))).max() == 0.0
    single = np.zeros((10, 10), dtype=np.float32)
    single[3, 3] = 0.25  # fewer bright pixels than the top 1 %: divided by the maximum instead
    assert saturate(single)[3, 3] == 1.0 and saturate(single).sum() == 1.0


def test_explanation_overlay_chooses_the_style_per_method_and_takes_another():
    torch.manual_seed(0)
    model = cl.load_model(TinyNet(), input_size=16)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    saliency = cl.explain(model, [picture], method="saliency")
    gradcam = cl.explain(model, [picture], method="gradcam")
    alone = overlay_heatmap(picture, saliency.maps[0], style="map")
    assert np.array_equal(np.asarray(saliency.overlay()[0]), np.asarray(alone))
    over = overlay_heatmap(picture, gradcam.maps[0], style="blend", colormap="jet", alpha=0.4)
    assert np.array_equal(np.asarray(gradcam.overlay()[0]), np.asarray(over))
    blended = overlay_heatmap(picture, saliency.maps[0], style="blend", colormap="viridis", alpha=0.5)
    assert np.array_equal(np.asarray(saliency.overlay(style="blend", colormap="viridis", alpha=0.5)[0]),
                          np.asarray(blended))
    with pytest.raises(cl.ConvlensError, match="unknown heatmap style 'mapp'; did you mean 'map'"):
        saliency.overlay(style="mapp")


def test_the_comparison_figure_draws_one_labelled_colour_bar_per_legend():
    photo = Image.new("RGB", (40, 30), (10, 20, 30))
    legends = [("jet", "gradcam: " + describe_style("blend")), ("inferno", "saliency: " + describe_style("map"))]
    figure = comparison_figure(photo, [("gradcam", photo), ("saliency", photo)], legends=legends)
    bars = [axis for axis in figure.axes if not axis.images]
    assert len(bars) == 2
    labels = sorted(bar.get_xlabel() for bar in bars)
    assert labels == sorted(f"attribution: {label}" for _, label in legends)
    for bar in bars:
        assert [t.get_text() for t in bar.get_xticklabels()] == ["low", "high"]
    assert "jet over the photo at opacity 0.4" in labels[0]
    assert "the map alone on black (inferno), its top 1 % of pixels at full brightness" in labels[1]
    assert len(comparison_figure(photo, [("gradcam", photo)]).axes) == 2  # no legends, no bars


def test_the_css_colour_bar_runs_through_the_colormap_low_to_high():
    css = colorbar_css("jet", stops=3)
    low, middle, high = colorize(np.array([0.0, 0.5, 1.0]), "jet")
    assert css == "linear-gradient(to right, " + ", ".join(
        "#%02x%02x%02x" % tuple(int(c) for c in rgb) for rgb in (low, middle, high)) + ")"
    assert set(STYLES) == {"blend", "map"}
