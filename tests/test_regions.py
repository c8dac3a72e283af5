"""Region descriptors, region targets and the superpixel oracle on hand-made label maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from mllm_ris.processing import (
    COLOR_DIM,
    GEOMETRY_DIM,
    GEOMETRY_FIELDS,
    SHAPE_SIZE,
    RegionInputError,
    batch_region_descriptors,
    oracle_mask,
    region_coverage,
    region_descriptors,
    region_targets,
    superpixel_ceiling_counts,
    superpixel_ceiling_iou,
)

G = {name: i for i, name in enumerate(GEOMETRY_FIELDS)}


def _square_scene(s: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Region 1 = rows 2..5, cols 4..9 (a 4x6 box), pure red; region 0 = the rest, black."""
    labels = np.zeros((s, s), dtype=np.int32)
    labels[2:6, 4:10] = 1
    canvas = np.zeros((s, s, 3), dtype=np.uint8)
    canvas[labels == 1] = (255, 0, 0)
    return canvas, labels


def _voronoi(s: int, k: int, seed: int) -> np.ndarray:
    """A random ``(s, s)`` label map with ids ``0..k-1`` (nearest of ``k`` random seeds)."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform(0, s, (k, 2))  # (k, 2) as (y, x)
    yy, xx = np.mgrid[:s, :s]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2  # (s, s, k)
    return np.unique(d.argmin(-1), return_inverse=True)[1].reshape(s, s)  # consecutive ids


def test_shapes_and_dtypes() -> None:
    canvas, labels = _square_scene()
    d = region_descriptors(canvas, labels)
    assert d.num_regions == 2
    assert d.shape.shape == (2, SHAPE_SIZE, SHAPE_SIZE) and d.shape.dtype == np.float32
    assert d.color.shape == (2, COLOR_DIM) and d.color.dtype == np.float32
    assert d.geometry.shape == (2, GEOMETRY_DIM) and d.geometry.dtype == np.float32
    assert d.valid.dtype == bool and d.valid.all()


def test_square_region_shape_is_all_ones_and_hole_is_not() -> None:
    canvas, labels = _square_scene()
    d = region_descriptors(canvas, labels)
    np.testing.assert_array_equal(d.shape[1], np.ones((16, 16), np.float32))
    # region 0 spans the whole canvas with a 4x6 hole: its crop keeps the hole, mass is preserved
    assert d.shape[0].min() == 0.0 and d.shape[0].max() == 1.0
    np.testing.assert_allclose(d.shape[0].mean(), 1 - 24 / 256, atol=1e-6)


def test_shape_crop_is_area_preserving_on_random_regions() -> None:
    for s, k, seed in [(40, 9, 0), (13, 30, 1)]:  # down- and up-sampling (boxes smaller than 16)
        labels = _voronoi(s, k, seed)
        canvas = np.zeros((s, s, 3), np.uint8)
        d = region_descriptors(canvas, labels)
        assert d.shape.min() >= 0.0 and d.shape.max() <= 1.0
        geo = d.geometry
        box_px = (geo[:, G["x1"]] - geo[:, G["x0"]]) * (geo[:, G["y1"]] - geo[:, G["y0"]]) * s * s
        fill = geo[:, G["area"]] * s * s / box_px  # fraction of each box the region covers
        np.testing.assert_allclose(d.shape.reshape(k, -1).mean(1), fill, atol=1e-5)


def test_known_colour_gives_known_lab() -> None:
    canvas, labels = _square_scene()
    d = region_descriptors(canvas, labels)
    red_lab = rgb2lab(np.array([[[255, 0, 0]]], np.uint8))[0, 0]  # about (53.24, 80.09, 67.20)
    np.testing.assert_allclose(red_lab, [53.24, 80.09, 67.20], atol=0.01)
    np.testing.assert_allclose(d.color[1, :3], red_lab / 100, atol=1e-6)
    np.testing.assert_allclose(d.color[1, 3:], 0.0, atol=1e-6)
    np.testing.assert_allclose(d.color[0], 0.0, atol=1e-6)  # black: L = a = b = 0


def test_colour_std_of_a_two_colour_region() -> None:
    labels = np.zeros((4, 4), np.int64)
    canvas = np.zeros((4, 4, 3), np.uint8)
    canvas[:2] = 255  # half white (L = 100), half black (L = 0)
    d = region_descriptors(canvas, labels)
    np.testing.assert_allclose(d.color[0, 0], 0.5, atol=1e-4)  # mean L 50 / 100
    np.testing.assert_allclose(d.color[0, 3], 1.0, atol=1e-4)  # std L 50 / 50


def test_geometry_of_a_box_is_exact() -> None:
    canvas, labels = _square_scene()
    g = region_descriptors(canvas, labels).geometry[1]
    # pixel centres: x in 4.5..9.5 -> mean 7, y in 2.5..5.5 -> mean 4; the canvas is 16 px wide
    expected = {
        "cx": 7 / 16,
        "cy": 4 / 16,
        "x0": 4 / 16,
        "y0": 2 / 16,
        "x1": 10 / 16,
        "y1": 6 / 16,
        "area": 24 / 256,
        "cov_xx": 12 * (6**2 - 1) / 12 / 256,  # discrete variance (n^2 - 1) / 12 px^2, x 12 / S^2
        "cov_xy": 0.0,
        "cov_yy": 12 * (4**2 - 1) / 12 / 256,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(g[G[name]], value, atol=1e-6, err_msg=name)


def test_geometry_of_full_canvas_and_a_diagonal() -> None:
    s = 32
    g = region_descriptors(np.zeros((s, s, 3), np.uint8), np.zeros((s, s), np.int32)).geometry[0]
    np.testing.assert_allclose(g[[G["cx"], G["cy"]]], 0.5, atol=1e-6)
    np.testing.assert_allclose(g[[G["x0"], G["y0"], G["x1"], G["y1"], G["area"]]], [0, 0, 1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(g[[G["cov_xx"], G["cov_yy"]]], 1 - 1 / s**2, atol=1e-6)
    labels = np.eye(s, dtype=np.int32)  # region 1 is the main diagonal: x == y
    g = region_descriptors(np.zeros((s, s, 3), np.uint8), labels).geometry[1]
    np.testing.assert_allclose(g[G["cov_xy"]], g[G["cov_xx"]], rtol=1e-5)
    assert g[G["cov_xy"]] > 0.5


def test_padding_is_ignored() -> None:
    canvas, labels = _square_scene()
    padded_labels = labels.copy()
    padded_labels[12:] = -1  # letterbox rows
    padded_canvas = canvas.copy()
    padded_canvas[12:] = (0, 255, 0)  # a colour that would show in the stats if counted
    d = region_descriptors(padded_canvas, padded_labels)
    ref = region_descriptors(canvas, labels)
    np.testing.assert_array_equal(d.shape[1], ref.shape[1])
    np.testing.assert_allclose(d.color, ref.color, atol=1e-6)  # region 0 is still all black
    np.testing.assert_allclose(d.geometry[0, G["area"]], (12 * 16 - 24) / 256)  # area over the whole canvas
    np.testing.assert_allclose(d.geometry[0, G["y1"]], 12 / 16)


def test_missing_ids_are_invalid_and_zero() -> None:
    labels = np.array([[0, 0, 2], [2, 2, -1]])
    d = region_descriptors(np.full((2, 3, 3), 200, np.uint8), labels, num_regions=5)
    np.testing.assert_array_equal(d.valid, [True, False, True, False, False])
    for arr in (d.shape, d.color, d.geometry):
        assert not arr[~d.valid].any()
    assert d.shape[d.valid].max() == 1.0


@pytest.mark.parametrize(
    ("canvas", "labels", "match"),
    [
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 7), np.int32), "canvas"),
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.int32), "canvas"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), "integer"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), -2), ">= -1"),
    ],
)
def test_bad_inputs_fail_loudly(canvas: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(RegionInputError, match=match):
        region_descriptors(canvas, labels)


def test_label_beyond_num_regions_fails() -> None:
    with pytest.raises(RegionInputError, match="num_regions 3"):
        region_descriptors(np.zeros((2, 2, 3), np.uint8), np.array([[0, 1], [2, 3]]), num_regions=3)


def test_batching_pads_with_a_mask() -> None:
    a = region_descriptors(*_square_scene())  # K = 2
    labels = np.array([[0, 0, 2], [2, 2, -1]])
    b = region_descriptors(np.zeros((2, 3, 3), np.uint8), labels, num_regions=4)  # K = 4, id 1 and 3 empty
    batch = batch_region_descriptors([a, b])
    assert batch.shape.shape == (2, 4, 16, 16)
    assert batch.color.shape == (2, 4, 6) and batch.geometry.shape == (2, 4, GEOMETRY_DIM)
    assert batch.shape.dtype == torch.float32
    assert batch.mask.tolist() == [[True, True, False, False], [True, False, True, False]]
    assert batch.num_regions.tolist() == [2, 4]
    torch.testing.assert_close(batch.geometry[0, :2], torch.from_numpy(a.geometry))
    assert not batch.shape[0, 2:].any()
    assert batch_region_descriptors([a], pad_to=6).mask.shape == (1, 6)
    assert batch_region_descriptors([a]).to("cpu").mask.shape == (1, 2)
    with pytest.raises(RegionInputError, match="pad_to"):
        batch_region_descriptors([a, b], pad_to=3)
    with pytest.raises(RegionInputError, match="empty"):
        batch_region_descriptors([])


def test_region_targets_threshold_semantics() -> None:
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [-1, -1, -1, -1]])
    target = np.zeros((3, 4, 4), bool)
    target[0, 0, :2] = True  # exactly 2 of region 0's 4 pixels: 50 %
    target[1, 0, 2] = True  # 1 of region 1's 4 pixels: 25 %
    target[1, 2, :3] = True  # 3 of region 2's 4 pixels: 75 %
    target[2, 3] = True  # only padding pixels
    cov = region_coverage(labels, target)
    np.testing.assert_allclose(cov, [[0.5, 0, 0], [0, 0.25, 0.75], [0, 0, 0]])
    t = region_targets(labels, target)
    assert t.dtype == np.float32
    np.testing.assert_array_equal(t, [[1, 0, 0], [0, 0, 1], [0, 0, 0]])  # exactly 50 % counts
    np.testing.assert_array_equal(region_targets(labels, target, 0.75), [[0, 0, 0], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(region_targets(labels, target, 0.25)[1], [0, 1, 1])
    assert region_targets(labels, target[:0]).shape == (0, 3)
    with pytest.raises(RegionInputError, match="threshold"):
        region_targets(labels, target, 0.0)
    with pytest.raises(RegionInputError, match="target_masks"):
        region_targets(labels, target[:, :3])


def test_coverage_matches_a_loop_on_random_maps() -> None:
    rng = np.random.default_rng(3)
    labels = _voronoi(24, 12, 4)
    labels[:3] = -1
    target = rng.random((4, 24, 24)) < 0.4
    cov = region_coverage(labels, target)
    for t in range(4):
        for k in range(12):
            inside = labels == k
            np.testing.assert_allclose(cov[t, k], target[t][inside].mean() if inside.any() else 0.0)


def test_oracle_ceiling_is_one_for_unions_of_regions() -> None:
    rng = np.random.default_rng(5)
    labels = _voronoi(32, 15, 6)
    labels[:, :4] = -1  # letterbox columns
    chosen = rng.random((5, 15)) < 0.4
    chosen[0] = False  # an empty target
    target = chosen[:, np.where(labels >= 0, labels, 0)] & (labels >= 0)  # (5, 32, 32) unions of regions
    np.testing.assert_array_equal(oracle_mask(labels, target), target)
    np.testing.assert_array_equal(superpixel_ceiling_iou(labels, target), np.ones(5))


def test_oracle_ceiling_below_one_matches_hand_count() -> None:
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    target = np.zeros((1, 4, 4), bool)
    target[0, :2, :3] = True  # region 0 whole (chosen), half of region 1 (chosen, exactly 50 %)
    target[0, 2, 0] = True  # 1 of 8 pixels of region 2 (not chosen)
    oracle = oracle_mask(labels, target)
    np.testing.assert_array_equal(oracle[0], labels <= 1)
    inter, union = superpixel_ceiling_counts(labels, target)
    assert inter.tolist() == [6] and union.tolist() == [9]
    np.testing.assert_allclose(superpixel_ceiling_iou(labels, target), [6 / 9])


def test_all_padding_gives_zero_regions() -> None:
    labels = np.full((4, 4), -1)
    d = region_descriptors(np.zeros((4, 4, 3), np.uint8), labels)
    assert d.shape.shape == (0, 16, 16) and d.geometry.shape == (0, GEOMETRY_DIM)
    assert region_targets(labels, np.ones((2, 4, 4), bool)).shape == (2, 0)
    np.testing.assert_array_equal(superpixel_ceiling_iou(labels, np.zeros((2, 4, 4), bool)), [1.0, 1.0])
