"""kpjax.data.augment: flips swap twins, keypoints move exactly with the pixels, colour jitter spares padding."""

import numpy as np
import pytest

from kpjax.data import keypoints as kp
from kpjax.data import augment
from kpjax.data import geometry as preprocess

SIZE = 64


def _symmetric_layout(category, size=SIZE, seed=0):
  """Input-pixel keypoints (L, 2) of `category`, mirror-symmetric about the vertical centre line."""
  rng = np.random.default_rng(seed)
  names = kp.keypoint_names(category)
  c = (size - 1) / 2
  pts = {}
  for name in names:
    if name in pts:
      continue
    x, y = rng.uniform(0, c - 1), rng.uniform(0, size - 1)
    if '_left' in name or '_right' in name:
      twin = name.replace('_left', '_right') if '_left' in name else name.replace('_right', '_left')
      pts[name], pts[twin] = (x, y), (size - 1 - x, y)
    else:
      pts[name] = (c, y)
  return np.array([pts[n] for n in names])


@pytest.mark.parametrize('category', kp.CATEGORIES + (kp.ALL,))
def test_flip_maps_every_left_keypoint_onto_its_right_twin(category):
  layout = _symmetric_layout(category)
  flip = augment.augmentation_affine(SIZE, flip=True)
  moved = preprocess.apply_affine(layout, flip)
  vis = np.arange(len(layout))
  swapped, swapped_vis = augment.flip_keypoints(moved, vis, category)
  # The mirrored garment, names swapped, is the same symmetric garment.
  np.testing.assert_allclose(swapped, layout, atol=1e-9)
  names = kp.keypoint_names(category)
  for i, name in enumerate(names):
    twin = names[swapped_vis[i]]
    assert twin == name.replace('_left', '#').replace('_right', '_left').replace('#', '_right')


def test_augmentation_affine_conventions():
  np.testing.assert_allclose(augment.augmentation_affine(SIZE), [[1, 0, 0], [0, 1, 0]], atol=1e-12)
  c = (SIZE - 1) / 2
  a = augment.augmentation_affine(SIZE, scale=1.7, angle_deg=33.0)
  np.testing.assert_allclose(preprocess.apply_affine([[c, c]], a), [[c, c]], atol=1e-9)  # centre fixed
  np.testing.assert_allclose(preprocess.apply_affine([[0, 5]], augment.augmentation_affine(SIZE, flip=True)),
                             [[SIZE - 1, 5]])
  np.testing.assert_allclose(preprocess.apply_affine([[c, c]], augment.augmentation_affine(SIZE, shift=(3, -2))),
                             [[c + 3, c - 2]])
  # 90 degrees turns +x into +y (clockwise on screen, y down).
  r = augment.augmentation_affine(SIZE, angle_deg=90.0)
  np.testing.assert_allclose(preprocess.apply_affine([[c + 1, c]], r), [[c, c + 1]], atol=1e-9)
  assert abs(np.linalg.det(a[:, :2]) - 1.7 ** 2) < 1e-9


def _blob_image(height, width, center, sigma=2.5):
  ys, xs = np.mgrid[0:height, 0:width]
  blob = np.exp(-((xs - center[0]) ** 2 + (ys - center[1]) ** 2) / (2 * sigma ** 2))
  return np.repeat((blob * 250).round().astype(np.uint8)[..., None], 3, axis=-1)


def _centroid(values):
  ys, xs = np.mgrid[0:values.shape[0], 0:values.shape[1]]
  w = np.clip(values, 0, None)
  return np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


def test_keypoints_move_exactly_with_the_pixels():
  cfg = augment.AugmentConfig(scale=(0.75, 1.25), rotation_deg=30.0, translate=0.15, flip=True)
  height, width = 96, 128
  rng = np.random.default_rng(1)
  checked = 0
  for seed in range(40):
    point = rng.uniform([20, 20], [width - 21, height - 21]).round()
    points, vis = np.repeat(point[None], 24, 0), np.ones(24, np.int32)
    out, moved, _, affine = augment.augment_example(_blob_image(height, width, point), points, vis, kp.ALL, SIZE,
                                                    cfg, np.random.default_rng(seed))
    blank = np.zeros((height, width, 3), np.uint8)
    ref, _, _, affine_blank = augment.augment_example(blank, points, vis, kp.ALL, SIZE, cfg,
                                                      np.random.default_rng(seed))
    np.testing.assert_array_equal(affine, affine_blank)
    np.testing.assert_allclose(moved, preprocess.apply_affine(points, affine))
    if np.any(moved < 8) or np.any(moved > SIZE - 9):  # the blob must lie wholly inside the input
      continue
    found = _centroid((out - ref).mean(-1))
    assert np.linalg.norm(found - moved[0]) < 0.2, (seed, found, moved)  # measured <= 0.05
    checked += 1
  assert checked >= 20


def test_flip_also_mirrors_the_pixels():
  cfg = augment.AugmentConfig(flip=True)
  image = _blob_image(80, 80, (20, 40))
  flips = 0
  for seed in range(8):
    out, moved, _, affine = augment.augment_example(image, np.full((24, 2), [20.0, 40.0]), np.ones(24, np.int32),
                                                    kp.ALL, SIZE, cfg, np.random.default_rng(seed))
    flipped = affine[0, 0] < 0
    flips += flipped
    found = _centroid(out.mean(-1) - np.median(out.mean(-1)))
    assert (found[0] > SIZE / 2) == flipped
    assert np.linalg.norm(found - moved[0]) < 0.5
  assert 0 < flips < 8


def test_color_jitter_changes_the_image_but_not_the_padding():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (100, 60, 3)).astype(np.uint8)
  affine = preprocess.letterbox_affine(100, 60, SIZE)
  warped = preprocess.warp_image(image, affine, SIZE)
  valid = augment.source_coverage(affine, 100, 60, SIZE)
  # Coverage agrees with warping an all-white image (padding keeps the fill colour).
  white = preprocess.warp_image(np.full_like(image, 255), affine, SIZE)
  assert np.all(white[valid] == 255)
  assert np.all(white[~valid].max(-1) < 255)
  assert 0.5 < valid.mean() < 0.7  # 60 of 100 columns wide
  out = augment.color_jitter(warped, np.random.default_rng(3), 0.4, valid)
  assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 255
  np.testing.assert_array_equal(out[~valid], warped[~valid].astype(np.float32))
  assert np.abs(out[valid] - warped[valid]).mean() > 1.0
  np.testing.assert_array_equal(augment.color_jitter(warped, np.random.default_rng(3), 0.0), warped)


def test_augment_config_from_config_and_range_checks():
  from kpjax.train import config_check
  from kpjax.configs import base as base_config
  config = base_config.get_config()
  config.augment.update(dict(scale=(0.75, 1.25), rotation_deg=20.0, translate=0.1, flip=True, color_jitter=0.2))
  cfg = augment.AugmentConfig.from_config(config.augment)
  assert cfg.scale == (0.75, 1.25) and cfg.flip
  config.augment.enabled = False
  assert augment.AugmentConfig.from_config(config.augment) is None
  for field, bad in (('scale', (1.2, 0.8)), ('rotation_deg', -1.0), ('color_jitter', 1.5)):
    broken = base_config.get_config()
    broken.augment[field] = bad
    with pytest.raises(ValueError, match=field):
      config_check.check_config(broken)