"""kpjax.inference.confidence: heatmap mass near the heatmap's own mean, checked on hand-made maps."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kpjax.inference import confidence


def _gaussian(h, w, cx, cy, sigma):
  ys, xs = np.mgrid[0:h, 0:w]
  g = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2))
  return g / g.sum()


def test_the_trained_target_shape_is_about_as_confident_as_the_math_says():
  # A 2-D Gaussian of std 1 px holds 1 - exp(-r^2 / 2) of its mass within r; on a pixel grid, close to it.
  maps = jnp.asarray(_gaussian(64, 64, 30.0, 20.0, 1.0)[None, None])
  got = float(confidence.keypoint_confidence(maps)[0, 0])
  assert got == pytest.approx(1 - math.exp(-9 / 2), abs=0.01)


def test_one_pixel_is_certain_and_a_flat_map_is_not():
  point = np.zeros((1, 1, 16, 16), np.float32)
  point[0, 0, 5, 9] = 1.0
  flat = np.full((1, 1, 16, 16), 1 / 256, np.float32)
  got = np.asarray(confidence.keypoint_confidence(jnp.asarray(np.concatenate([point, flat], axis=1))))
  assert got[0, 0] == pytest.approx(1.0)
  # A flat map's mean is the centre: the disc of radius 3 around (7.5, 7.5) holds the pixels counted here.
  ys, xs = np.mgrid[0:16, 0:16]
  inside = ((xs - 7.5) ** 2 + (ys - 7.5) ** 2 <= 9).sum()
  assert got[0, 1] == pytest.approx(inside / 256, rel=1e-6)


def test_two_candidates_leave_the_mean_between_them_with_little_mass():
  maps = 0.5 * _gaussian(32, 32, 6.0, 16.0, 1.0) + 0.5 * _gaussian(32, 32, 26.0, 16.0, 1.0)
  got = float(confidence.keypoint_confidence(jnp.asarray(maps[None, None]))[0, 0])
  assert got < 1e-6  # the mean (16, 16) is 10 px from either peak


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match=r'\(B, L, H, W\)'):
    confidence.keypoint_confidence(jnp.zeros((2, 16, 16)))
