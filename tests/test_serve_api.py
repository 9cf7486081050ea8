"""kpjax.serve's API in-process (Starlette's TestClient): every endpoint, the answers (equal to kpjax.predict's
--json for the same images, raw or multipart, with and without flip), and every bad request answered with
a 4xx JSON error after which the server still answers."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from kpjax.data import keypoints as kp
from kpjax.inference import drawing
from kpjax.inference import prediction

import photo_variants as pv
import serve_fixture as sf

pytest.importorskip('starlette', reason="the serve extra (pip install 'kpjax[serve]') is not installed")

# pylint: disable=g-import-not-at-top,wrong-import-position
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from kpjax.serve import app as app_lib
from kpjax.serve import runner as runner_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

MAX_UPLOAD = 100_000  # bytes
MAX_PIXELS = 40_000  # the garment photo has 30,000


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  ckpt = sf.small_model(str(tmp_path_factory.mktemp('model') / 'small-all'))
  runner = runner_lib.ModelRunner(ckpt, max_batch=2)
  runner.compile()
  return ckpt, runner


@pytest.fixture(scope='module')
def client(model):
  app = app_lib.create_app(model[1], max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, max_delay_ms=1)
  with TestClient(app) as c:
    yield c


@pytest.fixture(scope='module')
def photo_png():
  return pv.encode(pv.garment_photo()[0], 'PNG')


def _metrics(client) -> dict:
  text = client.get('/metrics').text
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for family in text_string_to_metric_families(text) for s in family.samples}


def test_page_and_static_files(client):
  page = client.get('/')
  assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
  assert '<input id="file" type="file" accept="image/*">' in page.text
  links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
  assert 'static/app.js' in links and 'static/style.css' in links
  assert all('//' not in link for link in links), links  # nothing fetched from elsewhere: the page works offline
  for name, kind in (('app.js', 'javascript'), ('style.css', 'text/css')):
    response = client.get(f'/static/{name}')
    assert response.status_code == 200 and kind in response.headers['content-type']
    assert not re.search(r'https?://(?!www\.w3\.org/2000/svg)|@import|url\(', response.text)  # the SVG namespace only
  assert client.get('/static/nothing.js').json()['error'].startswith('no such page')


def test_model_health_and_metrics(client, model):
  info = client.get('/v1/model').json()
  assert info['category'] == 'all' and info['categories'] == list(kp.CATEGORIES)
  assert info['keypoints'] == {c: list(kp.keypoint_names(c)) for c in kp.CATEGORIES}
  for category, edges in info['skeleton'].items():
    assert edges == [list(e) for e in drawing.SKELETON[category]]
  assert info['colors']['cuff_left_in'] == '#288cff' and info['colors']['crotch'] == '#ffc800'
  assert info['batch_sizes'] == [1, 2] and info['input_size'] == sf.SIZE and info['metadata']['category'] == 'all'
  assert info['limits'] == {'max_upload_bytes': MAX_UPLOAD, 'max_pixels': MAX_PIXELS, 'max_pending': 256}
  assert info['checkpoint'] == model[0] and 'JPEG' in info['formats']
  assert client.get('/healthz').json() == {'status': 'ok', 'model': info['name']}
  metrics = _metrics(client)
  assert metrics[('kpjax_requests_total', (('endpoint', '/healthz'), ('status', '200')))] >= 0  # counted after it
  assert metrics[('kpjax_requests_total', (('endpoint', '/v1/model'), ('status', '200')))] >= 1


@pytest.mark.parametrize('flip', [False, True])
def test_answers_equal_kpjax_predict(client, model, tmp_path, flip):
  """Raw bodies and multipart uploads, options as query or form fields: the same keypoints as
  `kpjax.predict --json` for the same images (other batch shapes: float32 rounding only)."""
  rng = np.random.default_rng(4)
  files = {'Images/blouse/a.jpg': (120, 90), 'Images/skirt/b.png': (64, 140), 'Images/dress/c.webp': (100, 100)}
  for name, (h, w) in files.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  categories = tmp_path / 'test.csv'
  categories.write_text('image_id,image_category\n' + ''.join(f'{n},{n.split("/")[1]}\n' for n in files))
  out = tmp_path / 'p.json'
  prediction.predict_files(model[0], [str(tmp_path / 'Images')], str(tmp_path / 'p.csv'), json_out=str(out),
                           categories_csv=str(categories), flip=flip, log=lambda _: None)
  expected = {r['image_id']: r for r in json.loads(out.read_text())['images']}
  for name in files:
    category, data = name.split('/')[1], (tmp_path / name).read_bytes()
    raw = client.post('/v1/predict', params={'category': category, 'flip': str(flip).lower()}, content=data)
    form = client.post('/v1/predict', files={'image': (name, data, 'application/octet-stream')},
                       data={'category': category, 'flip': '1' if flip else '0'})
    mixed = client.post(f'/v1/predict?flip={"yes" if flip else "no"}', files={'image': ('x', data)},
                        data={'category': category})
    for response in (raw, form, mixed):
      assert response.status_code == 200, response.text
      answer = response.json()
      assert set(answer) == {'model', 'category', 'image', 'keypoints', 'flip', 'batch_size', 'timing_ms'}
      assert answer['flip'] is flip and answer['category'] == category and answer['model'] == model[1].name
      assert set(answer['timing_ms']) == {'decode', 'queue', 'model', 'total'} and answer['batch_size'] in (1, 2)
      want = expected[name]
      assert answer['image'] == want['image'] and [k['name'] for k in answer['keypoints']] == \
          [k['name'] for k in want['keypoints']] == list(kp.keypoint_names(category))
      for got_k, want_k in zip(answer['keypoints'], want['keypoints']):
        assert got_k['x'] == pytest.approx(want_k['x'], abs=0.01) and got_k['y'] == pytest.approx(want_k['y'], abs=0.01)
        assert got_k['confidence'] == pytest.approx(want_k['confidence'], abs=1e-4)
        assert 0 <= got_k['confidence'] <= 1


def _chunks(data: bytes, size: int = 16_384):
  for i in range(0, len(data), size):
    yield data[i:i + size]


BAD_REQUESTS = {
    'empty body': (lambda p: dict(method='POST', url='/v1/predict?category=skirt', content=b''), 400, 'empty body'),
    'not an image': (lambda p: dict(method='POST', url='/v1/predict?category=skirt', content=b'<html>hello</html>'),
                     400, 'not a file of a format kpjax reads'),
    'truncated file': (lambda p: dict(method='POST', url='/v1/predict?category=skirt', content=p[:len(p) // 2]),
                       400, 'cannot decode image'),
    'body over the limit': (lambda p: dict(method='POST', url='/v1/predict?category=skirt', content=b'x' * 150_000),
                            413, 'the body is 150,000 bytes; the server takes at most 100,000 bytes'),
    'chunked body over the limit': (lambda p: dict(method='POST', url='/v1/predict?category=skirt',
                                                   content=_chunks(b'x' * 150_000)),
                                    413, 'the body is over 100,000 bytes'),
    'too many pixels': (lambda p: dict(method='POST', url='/v1/predict?category=skirt',
                                       content=pv.encode(np.zeros((250, 300, 3), np.uint8), 'PNG')),
                        413, '300x250 is 75,000 pixels, more than the 40,000 accepted'),
    'unknown category': (lambda p: dict(method='POST', url='/v1/predict?category=hat', content=p),
                         400, "unknown category 'hat'"),
    'no category for an all model': (lambda p: dict(method='POST', url='/v1/predict', content=p),
                                     400, 'keypoints of fashionai: say the garment category with category='),
    'bad flip': (lambda p: dict(method='POST', url='/v1/predict?category=skirt&flip=maybe', content=p),
                 400, "flip must be true or false"),
    'unknown option': (lambda p: dict(method='POST', url='/v1/predict?category=skirt&flp=1', content=p),
                       400, "unknown query parameter 'flp'"),
    'option given twice': (lambda p: dict(method='POST', url='/v1/predict?category=skirt',
                                          files={'image': ('a.png', p)}, data={'category': 'dress'}),
                           400, 'category is given twice'),
    'multipart without image': (lambda p: dict(method='POST', url='/v1/predict', files={'photo': ('a.png', p)}),
                                400, "unknown form field 'photo'"),
    'multipart image as text': (lambda p: dict(method='POST', url='/v1/predict', files={'image': (None, 'abc')}),
                                400, 'must be a file'),
    'two files': (lambda p: dict(method='POST', url='/v1/predict?category=skirt',
                                 files=[('image', ('a.png', p)), ('image', ('b.png', p))]), 400, 'Too many files'),
    'wrong method': (lambda p: dict(method='GET', url='/v1/predict'), 405,
                     'GET is not allowed on /v1/predict; use POST'),
    'wrong method on the page': (lambda p: dict(method='DELETE', url='/'), 405, 'DELETE is not allowed on /'),
    'wrong path': (lambda p: dict(method='POST', url='/v2/predict', content=p), 404, 'no such page: POST /v2/predict'),
}


@pytest.mark.parametrize('case', sorted(BAD_REQUESTS))
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(client, photo_png, case):
  make, status, message = BAD_REQUESTS[case]
  response = client.request(**make(photo_png))
  assert response.status_code == status, response.text
  assert response.headers['content-type'] == 'application/json'
  body = response.json()
  assert list(body) == ['error'] and message in body['error'], body
  after = client.post('/v1/predict?category=skirt', content=photo_png)
  assert after.status_code == 200 and len(after.json()['keypoints']) == 4


def test_a_failing_forward_pass_answers_500_and_the_next_succeeds(client, model, photo_png, monkeypatch, capsys):
  runner = model[1]
  calls = []

  def broken(flip, batch):
    calls.append(len(batch))
    raise RuntimeError('device lost')

  with monkeypatch.context() as m:
    m.setattr(runner, 'run', broken)
    response = client.post('/v1/predict?category=skirt', content=photo_png)
  assert response.status_code == 500 and response.json() == {'error': 'internal error: RuntimeError: device lost'}
  assert calls == [1] and 'device lost' in capsys.readouterr().err  # the traceback is logged
  assert client.post('/v1/predict?category=skirt', content=photo_png).status_code == 200


def test_busy_server_answers_503(model, photo_png):
  with TestClient(app_lib.create_app(model[1], max_pending=0)) as busy:
    response = busy.post('/v1/predict?category=skirt', content=photo_png)
    assert response.status_code == 503 and response.headers['retry-after'] == '1'
    assert 'busy' in response.json()['error']
    assert busy.get('/healthz').status_code == 200


def test_metrics_count_requests_errors_and_batches(client, photo_png):
  before = _metrics(client)
  for _ in range(3):
    assert client.post('/v1/predict?category=dress&flip=1', content=photo_png).status_code == 200
  assert client.post('/v1/predict?category=hat', content=photo_png).status_code == 400
  after = _metrics(client)

  def delta(name, *labels):
    key = (name, tuple(sorted(labels)))
    return after.get(key, 0) - before.get(key, 0)

  ok = (('endpoint', '/v1/predict'), ('status', '200'))
  bad = (('endpoint', '/v1/predict'), ('status', '400'))
  assert delta('kpjax_requests_total', *ok) == 3 and delta('kpjax_requests_total', *bad) == 1
  assert delta('kpjax_request_errors_total', *bad) == 1 and delta('kpjax_request_errors_total', *ok) == 0
  assert delta('kpjax_request_seconds_count', ('endpoint', '/v1/predict')) == 4
  assert delta('kpjax_batch_size_count') == 3 and delta('kpjax_batch_size_sum') == 3  # one at a time here
  assert delta('kpjax_decode_seconds_count') == 3 and delta('kpjax_forward_seconds_count') == 3
  assert after[('kpjax_in_flight', ())] == 0


def test_per_category_model_answers_its_own_category(tmp_path, photo_png):
  ckpt = sf.small_model(str(tmp_path / 'trousers'), 'trousers')
  runner = runner_lib.ModelRunner(ckpt, max_batch=1)
  runner.compile()
  with TestClient(app_lib.create_app(runner)) as c:
    answer = c.post('/v1/predict', content=photo_png).json()
    assert answer['category'] == 'trousers' and len(answer['keypoints']) == 7
    assert c.post('/v1/predict?category=trousers', content=photo_png).status_code == 200
    wrong = c.post('/v1/predict?category=skirt', content=photo_png)
    assert wrong.status_code == 400 and 'this trousers model answers category=trousers' in wrong.json()['error']
    assert c.get('/v1/model').json()['categories'] == ['trousers']


def test_an_image_of_a_few_pixels_and_a_huge_one_in_bytes(client):
  tiny = client.post('/v1/predict?category=skirt', content=pv.encode(np.full((1, 1, 3), 128, np.uint8), 'PNG'))
  assert tiny.status_code == 200 and tiny.json()['image'] == {'width': 1, 'height': 1}
  assert all(k['x'] == 0 and k['y'] == 0 for k in tiny.json()['keypoints'])  # inside the 1-pixel image
  buf = io.BytesIO()
  Image.fromarray(np.zeros((150, 180, 3), np.uint8)).save(buf, 'BMP')  # 81 KB: under the body limit
  assert client.post('/v1/predict?category=skirt', content=buf.getvalue()).status_code == 200


def test_a_model_of_another_keypoint_set_is_served_with_its_own_names(tmp_path, photo_png):
  """Serving carries the keypoint set: /v1/model describes it, answers name its keypoints, flips swap its pairs."""
  from kpjax.data import coco  # pylint: disable=g-import-not-at-top
  from kpjax.data import keypoint_sets  # pylint: disable=g-import-not-at-top
  from kpjax.data.synthetic import shapes  # pylint: disable=g-import-not-at-top
  kset = coco.keypoint_set(coco.read_categories({'categories': list(shapes.CATEGORIES)}, 'shapes', ValueError).values(),
                           'shapes')
  ckpt = sf.small_model(str(tmp_path / 'shapes-all'), keypoint_set=kset)
  runner = runner_lib.ModelRunner(ckpt, max_batch=1)
  runner.compile()
  with TestClient(app_lib.create_app(runner, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS)) as c:
    described = c.get('/v1/model').json()
    assert keypoint_sets.KeypointSet.from_json(described['keypoint_set']) == kset
    assert described['categories'] == list(kset.category_names)
    for category in kset.category_names:
      assert described['keypoints'][category] == list(kset.keypoint_names(category))
      assert described['skeleton'][category] == [list(e) for e in kset.skeleton(category)]
      for flip in ('false', 'true'):
        answer = c.post(f'/v1/predict?category={category}&flip={flip}', content=photo_png)
        assert answer.status_code == 200, answer.text
        assert [k['name'] for k in answer.json()['keypoints']] == list(kset.keypoint_names(category))
    missing = c.post('/v1/predict', content=photo_png)
    assert missing.status_code == 400 and f'keypoints of {kset.name}' in missing.json()['error']

