"""`python -m kpjax.serve` as a user runs it: a real server process on 127.0.0.1 under a bounded load test
(none lost, answers equal to kpjax.predict's, batches of more than one image), the page in a real headless
Chromium (Debian's chromium and chromium-driver, driven by selenium), Ctrl-C, and the command line's errors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

import numpy as np
import pytest
from PIL import Image

from kpjax.cli import serve as serve_cli
from kpjax.data import keypoints as kp
from kpjax.data.synthetic import garments
from kpjax.inference import prediction

import serve_fixture as sf
import train_fixture as fx

pytest.importorskip('uvicorn', reason="the serve extra (pip install 'kpjax[serve]') is not installed")

from benchmarks import serve as serve_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

CLIENTS, REQUESTS = 16, 400
BROWSER_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--window-size=1280,860')


@pytest.fixture(scope='module')
def garments_dir(tmp_path_factory):
  """Synthetic garment JPEGs of the five categories and several sizes, with their test.csv."""
  root = tmp_path_factory.mktemp('garments')
  rows = []
  for i, (category, (w, h)) in enumerate(zip(kp.CATEGORIES * 2, [(200, 150), (96, 160), (128, 128), (300, 180),
                                                                  (150, 210), (180, 120), (140, 140), (160, 90),
                                                                  (120, 200), (256, 192)])):
    example = garments.render(category, np.random.default_rng(i), width=w, height=h)
    path = root / 'Images' / category / f'{i}.jpg'
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(example.image).save(path, quality=90)
    rows.append(f'Images/{category}/{i}.jpg,{category}\n')
  (root / 'test.csv').write_text('image_id,image_category\n' + ''.join(rows))
  return root


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  ckpt = sf.small_model(str(tmp_path_factory.mktemp('model') / 'small-all'))
  process = serve_bench.ServerProcess(ckpt, '--max-batch', '4', '--max-delay-ms', '20', port=fx.free_port(),
                                      timeout_s=300)
  process.start()
  yield ckpt, process
  status = process.stop()
  assert status == 0 and 'Traceback' not in process.output(), process.output()[-3000:]


def test_load_none_lost_answers_equal_predict_and_batches_form(server, garments_dir, tmp_path):
  ckpt, process = server
  images = sorted((garments_dir / 'Images').rglob('*.jpg'))
  expected = {}
  for flip in (False, True):
    out = tmp_path / f'predict-{flip}.json'
    prediction.predict_files(ckpt, [str(garments_dir / 'Images')], str(tmp_path / 'p.csv'), flip=flip,
                             categories_csv=str(garments_dir / 'test.csv'), json_out=str(out), log=lambda _: None)
    for record in json.loads(out.read_text())['images']:
      expected[record['image_id'], flip] = record
  plan = [(images[i % len(images)], i % 3 == 0) for i in range(REQUESTS)]  # a third with flip TTA
  requests = [serve_bench.Request(path.read_bytes(), f'category={path.parent.name}&flip={str(flip).lower()}')
              for path, flip in plan]
  before = serve_bench.batch_counts(serve_bench.read_metrics(process.url))
  answers = serve_bench.run_load(process.url, requests, CLIENTS, timeout_s=300)
  after = serve_bench.batch_counts(serve_bench.read_metrics(process.url))

  assert [a.status for a in answers] == [200] * REQUESTS, next(a for a in answers if a.status != 200)
  for (path, flip), answer in zip(plan, answers):
    got = json.loads(answer.body)
    want = expected[f'Images/{path.parent.name}/{path.name}', flip]
    assert got['image'] == want['image'] and got['category'] == want['category'] and got['flip'] is flip
    assert [k['name'] for k in got['keypoints']] == [k['name'] for k in want['keypoints']]
    for g, w in zip(got['keypoints'], want['keypoints']):  # other batch shapes: float32 rounding only
      assert abs(g['x'] - w['x']) <= 0.01 and abs(g['y'] - w['y']) <= 0.01, (path, flip, g, w)
      assert abs(g['confidence'] - w['confidence']) <= 1e-4
  passes, images_run, alone = (a - b for a, b in zip(after, before))
  assert images_run == REQUESTS  # every request ran once
  assert passes < REQUESTS and alone < passes, (passes, alone)  # some forward passes held several images
  largest = max(a.body and json.loads(a.body)['batch_size'] for a in answers)
  assert 1 < largest <= 4


def _chromium():
  for name in ('chromium', 'chromium-browser', 'google-chrome'):
    if shutil.which(name):
      return shutil.which(name)
  return None


def _browser(user_data_dir: str):
  """Headless system Chromium through selenium and the system chromedriver (nothing downloaded)."""
  webdriver = pytest.importorskip('selenium.webdriver', reason='selenium (a test extra) is not installed')
  binary, driver = _chromium(), shutil.which('chromedriver')
  if not binary or not driver:
    pytest.skip('the page test needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver)')
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for flag in BROWSER_FLAGS + (f'--user-data-dir={user_data_dir}',):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def drive_page(url: str, image: str, screenshot: str, category: str | None = None, hover: str | None = None) -> dict:
  """Opens the page in a fresh browser profile, chooses `image` in its file input (after `category`), waits
  for the drawing, saves a screenshot (hovering the table row of keypoint `hover`, which shows its name);
  returns what the page shows. (docs/serve_page.png: the demo model, an unseen synthetic dress, 'shoulder_left'.)"""
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import Select, WebDriverWait  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as fresh:
    browser = _browser(fresh)
    try:
      browser.get(url)

      def state(b):
        return b.find_element(By.TAG_NAME, 'body').get_attribute('data-state')

      WebDriverWait(browser, 60).until(lambda b: state(b) == 'ready')
      preset = Select(browser.find_element(By.ID, 'category')).first_selected_option.text
      if category:
        Select(browser.find_element(By.ID, 'category')).select_by_value(category)
      browser.find_element(By.CSS_SELECTOR, 'input[type=file]').send_keys(image)
      WebDriverWait(browser, 60).until(lambda b: state(b) in ('done', 'error'))
      rows = [[td.text for td in tr.find_elements(By.TAG_NAME, 'td')]
              for tr in browser.find_elements(By.CSS_SELECTOR, '#keypoints tbody tr')]
      shown = {
          'state': state(browser), 'status': browser.find_element(By.ID, 'status').text, 'preset': preset,
          'rows': rows, 'circles': len(browser.find_elements(By.CSS_SELECTOR, '#overlay circle')),
          'lines': len(browser.find_elements(By.CSS_SELECTOR, '#overlay line')),
          'photo_loaded': browser.execute_script("return document.getElementById('photo').naturalWidth"),
          'resources': browser.execute_script(
              "return performance.getEntriesByType('resource').map(e => e.name)"),
          'download': browser.find_element(By.ID, 'download').get_attribute('download'),
      }
      if hover:
        ActionChains(browser).move_to_element(
            browser.find_element(By.CSS_SELECTOR, f'#keypoints tr[data-name="{hover}"]')).perform()
      browser.save_screenshot(screenshot)
      return shown
    finally:
      browser.quit()


def test_page_in_a_headless_browser(server, garments_dir, tmp_path):
  _, process = server
  image = str(garments_dir / 'Images' / 'blouse' / '0.jpg')
  screenshot = str(tmp_path / 'page.png')
  shown = drive_page(process.url, image, screenshot, hover='shoulder_left')
  assert shown['state'] == 'done', shown['status']
  assert shown['preset'] == 'blouse'  # the first category, so that a photo predicts at once
  answer = json.loads(serve_bench.run_load(process.url, [serve_bench.Request(open(image, 'rb').read(),
                                                                             'category=blouse')], 1)[0].body)
  assert [r[0] for r in shown['rows']] == [k['name'] for k in answer['keypoints']] == list(kp.keypoint_names('blouse'))
  for (_, x, y, confidence), k in zip(shown['rows'], answer['keypoints']):
    assert abs(float(x) - k['x']) <= 0.05 + 1e-9 and abs(float(y) - k['y']) <= 0.05 + 1e-9  # shown to 0.1 px
    assert abs(float(confidence) - k['confidence']) <= 0.0005 + 1e-9  # and to 0.001
  from kpjax.inference import drawing  # pylint: disable=g-import-not-at-top
  assert shown['circles'] == len(answer['keypoints']) and shown['lines'] == len(drawing.SKELETON['blouse'])
  assert shown['photo_loaded'] == 200  # the photo itself is shown under the drawing
  assert shown['download'] == '0.keypoints.json'
  assert all(r.startswith(process.url) or r.startswith('blob:') for r in shown['resources']), shown['resources']
  with Image.open(screenshot) as im:
    assert im.size[0] >= 1000


def test_broken_model_is_one_error_line(tmp_path, capsys):
  (tmp_path / 'broken' / 'metadata').mkdir(parents=True)
  (tmp_path / 'broken' / 'params').mkdir()
  for path, expect in ((tmp_path / 'broken', 'cannot read'), (tmp_path / 'missing', 'does not exist')):
    assert serve_cli.main(['--checkpoint', str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and len(err.strip().splitlines()) == 1 and expect in err, err


def test_flag_errors_and_a_busy_port(tmp_path, capsys):
  for argv, expect in ((['--max-batch', '0'], '--max-batch must be at least 1'),
                       (['--port', '70000'], '--port must be 0..65535'),
                       (['--max-upload-mb', '0'], '--max-upload-mb must be more than 0')):
    with pytest.raises(SystemExit) as exit_info:
      serve_cli.main(['--checkpoint', str(tmp_path)] + argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith('error: ') and expect in err, err
  ckpt = sf.small_model(str(tmp_path / 'skirt'), 'skirt')
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert serve_cli.main(['--checkpoint', ckpt, '--port', str(port)]) == 2
  err = capsys.readouterr().err
  assert f'error: cannot listen on 127.0.0.1:{port}' in err and len(err.strip().splitlines()) == 1, err
