"""Photos as phones, shops and editors write them give the keypoints of the upright image a viewer shows,
in kpjax.predict and kpjax.serve alike (tests/photo_variants: EXIF orientations, alpha, palette, CMYK,
16 bits, grey, animated files, every format).

Colour files go through test_predict's colour-detector model, whose keypoints are the photo's red, green
and blue markers: within 0.75 input pixels of the markers' centres (test_predict's blob tests), whatever
JPEG or lossy WebP did to the pixels, and equal to the plain PNG's where the file holds the same pixels.
Grey files (8, 16, 32 bits, float, with alpha) go through a random network, which answers differently
for any other pixels: equal to the plain grey image's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from kpjax.data import keypoints as kp
from kpjax.inference import prediction

import photo_variants as pv
import serve_fixture as sf
import test_predict as tp

EQUAL_PX = 0.01  # the same pixels in another batch row or shape: float32 rounding only (test_predict's JSON test)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp('photos')
  photo, markers = pv.garment_photo()
  colour, grey = pv.colour_variants(photo), pv.grey_variants(photo)
  grey = {n: v for n, v in grey.items() if v.exact}  # a random network has no bound for lossy pixels
  for folder, variants in (('colour', colour), ('grey', grey)):
    os.makedirs(root / folder)
    for name, v in variants.items():
      (root / folder / name).write_bytes(v.data)
  models = tmp_path_factory.mktemp('models')
  marker_model = tp._save(models, 'markers', tp.colour_detector_variables(pv.DETECTORS), 'skirt')
  random_model = sf.small_model(str(models / 'random-skirt'), 'skirt')
  truth = markers[list(pv.DETECTORS)]  # (4, 2): each skirt keypoint's marker
  return dict(root=root, colour=colour, grey=grey, marker_model=marker_model, random_model=random_model,
              truth=truth, tol=0.75 * max(pv.HEIGHT, pv.WIDTH) / tp.SIZE)


def _xy(result) -> tuple[np.ndarray, tuple[int, int]]:
  """((4, 2) keypoints, (width, height)) of an answer."""
  assert [k['name'] for k in result['keypoints']] == list(kp.keypoint_names('skirt'))
  size = (result['image']['width'], result['image']['height'])
  return np.array([[k['x'], k['y']] for k in result['keypoints']]), size


def _check(photos, colour_xy: dict[str, np.ndarray], grey_xy: dict[str, np.ndarray]) -> None:
  """Every variant's keypoints against the markers and the plain image's; all failures in one message."""
  failures = []
  for name, (xy, size) in {**colour_xy, **grey_xy}.items():
    if size != (pv.WIDTH, pv.HEIGHT):
      failures.append(f'{name}: {size[0]}x{size[1]} px, not the upright photo\'s {pv.WIDTH}x{pv.HEIGHT}')
  plain = colour_xy['plain.png'][0]
  for name, v in photos['colour'].items():
    xy = colour_xy[name][0]
    off = np.abs(xy - photos['truth']).max()  # per coordinate, as test_predict's bound
    if off > photos['tol']:
      failures.append(f'{name}: keypoints {off:.1f} px from the markers (bound {photos["tol"]:.2f} px)')
    elif v.exact and np.abs(xy - plain).max() > EQUAL_PX:
      failures.append(f'{name}: {np.abs(xy - plain).max():.3g} px from the plain PNG\'s keypoints')
  for name in photos['grey']:
    off = np.linalg.norm(grey_xy[name][0] - grey_xy['grey_rgb.png'][0], axis=-1).max()
    if off > EQUAL_PX:
      failures.append(f'{name}: keypoints {off:.2f} px from the plain grey image\'s')
  assert not failures, 'keypoints differ from the upright image\'s:\n' + '\n'.join(failures)


def test_predict_reads_every_variant_as_the_upright_image(photos, tmp_path):
  """Fails before the decoder handled real photos: exif6.jpg (stored rotated, EXIF orientation 6) put the
  markers' keypoints ~100 px away, rgba.png's hidden colours and the clipped 16-bit grey files moved them."""
  results = {}
  for folder, model in (('colour', photos['marker_model']), ('grey', photos['random_model'])):
    summary = prediction.predict_files(model, [str(photos['root'] / folder)], str(tmp_path / f'{folder}.csv'),
                                       json_out=str(tmp_path / f'{folder}.json'), batch_size=8, log=lambda _: None)
    assert summary.predicted == len(photos[folder]) and not summary.problems
    records = json.loads((tmp_path / f'{folder}.json').read_text())['images']
    results[folder] = {r['image_id']: _xy(r) for r in records}
  _check(photos, results['colour'], results['grey'])


def test_serve_reads_every_variant_as_the_upright_image(photos):
  from starlette.testclient import TestClient  # pylint: disable=g-import-not-at-top
  from kpjax.serve import app as app_lib  # pylint: disable=g-import-not-at-top
  from kpjax.serve import runner as runner_lib  # pylint: disable=g-import-not-at-top
  results = {}
  for folder, model in (('colour', photos['marker_model']), ('grey', photos['random_model'])):
    runner = runner_lib.ModelRunner(model, max_batch=1)
    runner.compile()
    with TestClient(app_lib.create_app(runner)) as client:
      results[folder] = {}
      for name, v in photos[folder].items():
        response = client.post('/v1/predict', content=v.data)
        assert response.status_code == 200, (name, response.text)
        results[folder][name] = _xy(response.json())
  _check(photos, results['colour'], results['grey'])
