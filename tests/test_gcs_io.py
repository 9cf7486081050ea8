"""Models, datasets and outputs in a bucket, against a local Cloud Storage emulator (the `gcs` fixture,
conftest.py): staged writes are whole or absent; predict (images read from the bucket), evaluate, export and
both converters read and write gs:// and give what they give on a local disk; a dataset built into the
bucket reads like a local one; and each storage failure (no bucket, no credentials, permission denied)
is one error line, exit 2, with nothing written.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

import gcs_emulator
import train_fixture as fx
from convert import flax_to_torch, torch_to_flax
from kpjax.data import fashionai_csv as csv_io
from kpjax.data import sources
from kpjax.data.spec import ModelSpec
from kpjax.errors import TargetExistsError, TorchFileError
from kpjax.export import exporter
from kpjax.inference import checkpoints as ckpt_lib
from kpjax.inference import evaluation, prediction
from kpjax.io import atomic, paths, torch_file
from kpjax.train.log import MetricWriter, read_metrics
from test_gcs_train import error_lines
from test_parallel import REPO

TIMEOUT_S = 240


def _run(module, *flags, env=None):
  return subprocess.run([sys.executable, '-m', module, *flags], cwd=REPO, capture_output=True, text=True,
                        timeout=TIMEOUT_S, env={**os.environ, **(env or {})})


def test_staged_writes_on_gs_are_whole_or_absent(gcs, tmp_path):
  bucket = gcs.create_bucket('kpjax-atomic')
  with pytest.raises(RuntimeError):
    with atomic.staged_file(f'{bucket}/f.txt') as tmp:
      open(tmp, 'w').write('half')
      raise RuntimeError('the writer failed')
  assert gcs.objects('kpjax-atomic') == []
  assert atomic.write_text(f'{bucket}/f.txt', 'one\r\n') == f'{bucket}/f.txt'
  assert epath.Path(f'{bucket}/f.txt').read_bytes() == b'one\r\n'

  def build(new, text):
    os.makedirs(os.path.join(new, 'sub'))
    open(os.path.join(new, 'sub', 'a.txt'), 'w').write(text)

  with atomic.staged_dir(f'{bucket}/d') as new:
    build(new, 'old')
  assert gcs.objects('kpjax-atomic', 'd/') == ['d/commit_success.txt', 'd/sub/a.txt']  # the marker written last
  with pytest.raises(TargetExistsError, match='pass --force to replace it'):
    with atomic.staged_dir(f'{bucket}/d') as new:
      build(new, 'new')
  with atomic.staged_dir(f'{bucket}/d', first_wins=True) as new:  # another copy is in place: ours is dropped
    build(new, 'ours')
  with atomic.staged_dir(f'{bucket}/d', replace=True) as new:
    build(new, 'new')
  assert epath.Path(f'{bucket}/d/sub/a.txt').read_text() == 'new' and paths.is_complete(f'{bucket}/d')
  epath.Path(f'{bucket}/cut/sub/a.txt').write_text('an upload cut short: no marker')
  assert not paths.is_complete(f'{bucket}/cut') and paths.is_complete(f'{bucket}/d')

  # metrics.jsonl on gs:// (no appends): a resumed writer keeps the lines up to its step, once.
  writer = MetricWriter(f'{bucket}/run/metrics.jsonl', f'{bucket}/run/tensorboard')
  for step in (1, 2, 3):
    writer.write(step, {'train/loss': float(step)})
  writer.close()
  writer = MetricWriter(f'{bucket}/run/metrics.jsonl', f'{bucket}/run/tensorboard', resume_step=2)
  writer.write(3, {'train/loss': 30.0})
  writer.flush()
  assert read_metrics(f'{bucket}/run/metrics.jsonl') == [{'step': 1, 'train/loss': 1.0}, {'step': 2, 'train/loss': 2.0},
                                                         {'step': 3, 'train/loss': 30.0}]
  writer.close()
  assert len([o for o in gcs.objects('kpjax-atomic', 'run/tensorboard/') if 'tfevents' in o]) == 1


@pytest.fixture(scope='module')
def models(gcs, tmp_path_factory):
  """The same slim trousers model in a local directory and in the bucket: (config, local, gs://)."""
  config = fx.tiny_config()
  _, state = fx.step_and_state(config)
  metadata = ModelSpec.from_config(config).metadata(source='test')
  variables = {'params': jax.device_get(state.params)}
  local = ckpt_lib.save_model(str(tmp_path_factory.mktemp('model') / 'model'), variables, metadata)
  remote = ckpt_lib.save_model(f'{gcs.create_bucket("kpjax-models")}/model', variables, metadata)
  return config, local, remote


def _write_images(records, folder):
  for r in records:
    path = paths.resolve(f'{folder}/{r["image_id"]}')
    path.parent.mkdir(parents=True, exist_ok=True)  # nothing to do in a bucket
    path.write_bytes(r['image'])


def _annotations(records) -> str:
  return csv_io.format_submission([(r['image_id'], 'trousers', [csv_io.format_cell(x, y, v) for (x, y), v in
                                                                zip(r['keypoints'], r['visibility'])])
                                   for r in records])


def test_predict_evaluate_export_and_convert_with_a_model_in_the_bucket(gcs, models, tmp_path, monkeypatch):
  config, local, remote = models
  bucket = gcs.create_bucket('kpjax-run')
  records = fx.RECORDS['validation']
  _write_images(records, str(tmp_path / 'data'))
  _write_images(records, f'{bucket}/data')
  (tmp_path / 'gt.csv').write_text(_annotations(records))
  epath.Path(f'{bucket}/gt.csv').write_text(_annotations(records))

  # predict: images from the bucket (a glob), CSV and drawings into it; the same CSV as a local run.
  proc = _run('kpjax.predict', '--checkpoint', remote, '--images', f'{bucket}/data/Images/**/*.jpg',
              '--out', f'{bucket}/out/preds.csv', '--draw', f'{bucket}/out/draw')
  assert proc.returncode == 0, proc.stderr
  prediction.predict_files(local, [str(tmp_path / 'data')], str(tmp_path / 'preds.csv'), log=lambda _: None)
  assert epath.Path(f'{bucket}/out/preds.csv').read_text() == (tmp_path / 'preds.csv').read_text()
  assert len([o for o in gcs.objects('kpjax-run', 'out/draw/') if o.endswith('.png')]) == len(records)

  # evaluate: annotations and predictions read from the bucket, --json written to it.
  proc = _run('kpjax.evaluate', '--annotations', f'{bucket}/gt.csv', '--predictions', f'{bucket}/out/preds.csv',
              '--json', f'{bucket}/out/scores.json')
  assert proc.returncode == 0, proc.stderr
  want, _ = evaluation.evaluate_files(str(tmp_path / 'gt.csv'), str(tmp_path / 'preds.csv'))
  assert json.loads(epath.Path(f'{bucket}/out/scores.json').read_text())['ne'] == pytest.approx(want['ne'], rel=1e-12)
  fx.install_source(monkeypatch)  # and a model in the bucket over a dataset split
  assert evaluation.evaluate_model(config, remote)[0]['ne'] == evaluation.evaluate_model(config, local)[0]['ne']

  # export: the bucket's model to the bucket, the same function and metadata as from the local one.
  exporter.export_model(remote, 'stablehlo', f'{bucket}/out/model.stablehlo', log=lambda _: None)
  exporter.export_model(local, 'stablehlo', str(tmp_path / 'model.stablehlo'), log=lambda _: None)
  images = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  outputs = [jax.export.deserialize(data).call(images) for data in
             (epath.Path(f'{bucket}/out/model.stablehlo').read_bytes(), (tmp_path / 'model.stablehlo').read_bytes())]
  jax.tree_util.tree_map(np.testing.assert_array_equal, *outputs)
  assert epath.Path(f'{bucket}/out/model.stablehlo.json').read_text() == (tmp_path / 'model.stablehlo.json').read_text()

  # flax_to_torch from the bucket into it, torch_to_flax back: the model written to gs:// loads, unchanged.
  flax_to_torch.convert_checkpoint(config, remote, f'{bucket}/out/model.pth', log=lambda _: None)
  torch_to_flax.convert_checkpoint(config, f'{bucket}/out/model.pth', f'{bucket}/out/converted', input_size=32,
                                   preprocessing='kpjax', log=lambda _: None)
  paths.filesystem().get_file(f'{bucket}/out/model.pth', str(tmp_path / 'model.pth'))  # config.init_backbone's reader
  jax.tree_util.tree_map(np.testing.assert_array_equal, torch_file.read_state_dict(f'{bucket}/out/model.pth'),
                         torch_file.read_state_dict(str(tmp_path / 'model.pth')))
  with pytest.raises(TorchFileError, match=f'^{bucket}/out/missing.pth does not exist'):  # named as given
    torch_file.read_state_dict(f'{bucket}/out/missing.pth')
  got, metadata = ckpt_lib.load_model(f'{bucket}/out/converted')
  want, _ = ckpt_lib.load_model(local)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  assert metadata['source'] == 'model.pth' and ckpt_lib.locate(f'{bucket}/out/converted').kind == 'model'


def test_a_dataset_built_into_the_bucket_reads_like_a_local_one(gcs, tmp_path):
  from kpjax.data import build, synthetic
  bucket = gcs.create_bucket('kpjax-data')
  synthetic.generate(f'{bucket}/raw', 10, seed=3)  # the FashionAI layout, in the bucket
  synthetic.generate(str(tmp_path / 'raw'), 10, seed=3)
  summary = build.build_dataset(f'{bucket}/raw', f'{bucket}/tfds')  # --manual-dir and --data-dir gs://
  build.build_dataset(str(tmp_path / 'raw'), str(tmp_path / 'tfds'))
  assert summary.dataset_dir == f'{bucket}/tfds/fashionai_keypoints/1.0.0' and paths.is_complete(summary.dataset_dir)
  for split in ('train', 'validation'):
    remote = sources.open_tfds_source(f'{bucket}/tfds', 'fashionai_keypoints', split)  # array_record over HTTP
    local = sources.open_tfds_source(str(tmp_path / 'tfds'), 'fashionai_keypoints', split)
    assert len(remote) == len(local) > 0
    for i in range(len(local)):
      a, b = remote[i], local[i]
      assert a['image'] == b['image'] and a['image_id'] == b['image_id']
      np.testing.assert_array_equal(a['keypoints'], b['keypoints'])


def test_storage_failures_are_one_error_line_and_write_nothing(gcs, tmp_path):
  train = [sys.executable, '-m', 'kpjax.train', '--config', os.path.join(REPO, 'configs', 'trousers.py'),
           f'--config.data.data_dir={tmp_path}', '--workdir']
  bucket = gcs.create_bucket('kpjax-denied')
  # No credentials: no emulator, no ADC file, no metadata server.
  no_credentials = {**{k: '' for k in gcs.env()}, 'HOME': str(tmp_path), 'GOOGLE_APPLICATION_CREDENTIALS': '',
                    'GCE_METADATA_HOST': '127.0.0.1:9', 'GCE_METADATA_IP': '127.0.0.1:9', 'CLOUDSDK_CONFIG': str(tmp_path)}
  # Permission denied: the credentials may list and read the bucket but not write to it.
  proxy = gcs_emulator.FaultProxy.start(gcs.url)
  proxy.fail('POST', r'^/upload/', 403)
  proxy.fail('PUT', r'^/upload/', 403)
  runs = {'no bucket': ('gs://kpjax-no-such-bucket/run', {}), 'no credentials': (f'{bucket}/run', no_credentials),
          'permission denied': (f'{bucket}/run', gcs.env(proxy.url)), 'no extra': (f'{bucket}/run', {})}
  without_gcsfs = [sys.executable, '-c', 'import sys; sys.modules["gcsfs"] = None; from kpjax.cli import train; '
                   'sys.exit(train.main(sys.argv[1:]))', *train[3:]]  # as if `pip install kpjax` alone
  try:  # the four at once
    procs = {k: subprocess.Popen((without_gcsfs if k == 'no extra' else train) + [workdir], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
             for k, (workdir, env) in runs.items()}
    errors = {k: p.communicate(timeout=TIMEOUT_S)[1] for k, p in procs.items()}
    done = {k: (procs[k].returncode, error_lines(err)) for k, err in errors.items()}
  finally:
    proxy.stop()
  assert done['no bucket'] == (2, [
      'error: gs://kpjax-no-such-bucket: bucket kpjax-no-such-bucket does not exist (or is not visible to these '
      'credentials); create it (gcloud storage buckets create gs://BUCKET) or fix the path']), done
  with pytest.raises(FileNotFoundError):  # nor was it created
    paths.filesystem().info('kpjax-no-such-bucket')
  status, lines = done['no credentials']
  assert status == 2 and len(lines) == 1, done
  assert lines[0].startswith(f'error: no Google Cloud credentials for {bucket}: ') and \
      'gcloud auth application-default login' in lines[0], lines
  assert done['permission denied'] == (2, [
      f'error: {bucket}/run: cannot create objects there: permission denied (kpjax-test@example.iam.gserviceaccount.com '
      'does not have storage.objects.create access to the Google Cloud Storage object. Permission denied); the '
      'credentials need roles/storage.objectUser on bucket kpjax-denied']), done
  assert done['no extra'] == (2, [f"error: {bucket}/run is a Cloud Storage path, which needs the gcs extra (gcsfs is "
                                  "not installed): pip install 'kpjax[gcs]'"]), done
  assert gcs.objects('kpjax-denied') == []
