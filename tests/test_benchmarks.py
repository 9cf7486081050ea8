"""benchmarks/: each script's core at tiny sizes on the CPU, its figures' arithmetic, and its flag errors."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import common
from benchmarks import gpu
from benchmarks import inference
from benchmarks import input_pipeline
from benchmarks import memory
from benchmarks import train_step
import train_fixture as fx
from kpjax.configs import base
from kpjax.data import pipeline
from kpjax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--size', '16', '--batch', '2', '--width', '0.0625', '--num-stages', '1', '--no-peak', '--repeats', '1',
        '--warmup', '0', '--min-quiet', '0', '--quiet-wait-s', '0']


def _table_rows(text):
  """{first cell: cells} of the markdown table rows in `text` (header and rule left out)."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if line.startswith('|') and not line.startswith('|-'):
      rows[cells[0]] = cells
  return rows


def _error_line(capsys, run, argv):
  with pytest.raises(SystemExit) as exit_info:
    run(argv)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert len(err.strip().splitlines()) == 1 and err.startswith('error: '), err
  return err


# ---- train_step.py, inference.py, memory.py ---------------------------------------------------------


def test_train_step_prints_table_machine_and_ratio(capsys):
  pytest.importorskip('torch')
  pytest.importorskip('dsntnn')
  train_step.main(TINY + ['--remat'])
  out = capsys.readouterr().out
  rows = _table_rows(out)
  kp, torch_row = rows['kpjax (remat)'], rows['torch']  # --remat is honoured, and the row says so
  assert kp[1] == torch_row[1] == 'float32'
  assert float(kp[2]) > 0 and float(torch_row[2]) > 0
  assert common.cpu_model() in out  # the table names the CPU
  ratio = re.search(r'on (.+): kpjax/torch speed ratio \(float32\): ([0-9.]+)x \(kpjax ([0-9.]+) s/step, '
                    r'torch ([0-9.]+) s/step\)', out)
  assert ratio and common.cpu_model() in ratio.group(1)
  assert float(ratio.group(3)) == float(kp[2]) and float(ratio.group(4)) == float(torch_row[2])
  assert float(ratio.group(2)) == pytest.approx(float(ratio.group(4)) / float(ratio.group(3)), abs=0.006, rel=0.002)


def test_inference_times_forward_and_rejects_remat(capsys):
  pytest.importorskip('torch')
  pytest.importorskip('dsntnn')
  inference.main(TINY + ['--no-torch'])
  out = capsys.readouterr().out
  assert 'kpjax inference (forward) vs PyTorch' in out
  w = common.Workload(size=16, batch=2, width=0.0625, num_stages=1)
  assert f'{w.forward_flops() / 1e9:.1f} GFLOP per step' in out
  assert float(_table_rows(out)['kpjax'][2]) > 0
  err = _error_line(capsys, inference.main, TINY + ['--remat'])
  assert '--remat' in err


def test_compare_times_each_conv_algorithm_interleaved(capsys):
  inference.main(TINY + ['--no-torch', '--conv-algorithm', 'direct', '--compare', 'auto,direct-pooled,direct'])
  out = capsys.readouterr().out
  rows = _table_rows(out)
  assert {'kpjax', 'kpjax (auto)', 'kpjax (direct-pooled)'} <= set(rows) and 'kpjax (direct convs)' not in rows
  assert "# kpjax: conv_algorithm 'direct'" in out
  assert all(float(rows[name][2]) > 0 for name in ('kpjax', 'kpjax (auto)', 'kpjax (direct-pooled)'))
  err = _error_line(capsys, train_step.main, TINY + ['--compare', 'direct,fft'])
  assert 'direct-pooled' in err and "'direct,fft'" in err


def test_help_describes_each_script(capsys):
  with pytest.raises(SystemExit):
    inference.main(['--help'])
  out = capsys.readouterr().out
  assert 'Side-by-side inference benchmark' in out and 'training-step' not in out and '[--remat]' not in out
  with pytest.raises(SystemExit):
    train_step.main(['--help'])
  out = capsys.readouterr().out
  assert 'Side-by-side training-step benchmark' in out and '[--remat]' in out


@pytest.mark.parametrize('argv', [['--size', '20'], ['--batch', '0'], ['--num-stages', '7'], ['--width', '-1'],
                                  ['--category', 'hats'], ['--dtype', 'float16']])
def test_comparison_flag_errors(capsys, argv):
  _error_line(capsys, train_step.main, argv)


def test_memory_remat_keeps_less(capsys):
  w = common.Workload(size=16, batch=2, width=0.0625, num_stages=1)
  off = memory.compiled_memory(w).temp_size_in_bytes
  on = memory.compiled_memory(w.replace(remat=True)).temp_size_in_bytes
  assert 0 < on < off
  _error_line(capsys, memory.main, ['--sizes', '256,12'])
  _error_line(capsys, memory.main, ['--policies', 'no_such_policy'])


def test_train_flops_match_the_readme():
  w = common.Workload(category='trousers', size=256, batch=1)
  assert w.forward_flops() / 256 ** 2 == pytest.approx(73.8e6, rel=1e-3)
  assert w.train_flops() / 1e12 == pytest.approx(14.5, rel=1e-2)
  assert w.replace(size=512).train_flops() / 1e12 == pytest.approx(58.0, rel=1e-2)


# ---- input_pipeline.py ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return sources.ensure_synthetic(str(tmp_path_factory.mktemp('garments') / 'data'), 16, seed=0)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_input_pipeline_batches_are_kpjax_train_batches(tfds_dir):
  args = input_pipeline.parse_args(['--data-dir', tfds_dir, '--size', '32', '--batch', '3', '--seed', '5'])
  _, batches = input_pipeline.open_pipeline(input_pipeline.pipeline_config(args))
  config = base.get_config()  # as `python -m kpjax.train --config.data.data_dir=... ` would set it
  config.category, config.input_size, config.batch_size, config.seed = 'all', 32, 3, 5
  config.data.data_dir = tfds_dir
  expected = fx.train_batches(config, sources.get_source(config.data, 'train'), seed=5)
  for got, want in zip(_take(batches, 3), _take(expected, 3)):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert config.augment.enabled  # the benchmark times augmentation too


def test_input_pipeline_json(tfds_dir, tmp_path, capsys):
  out = tmp_path / 'r.json'
  input_pipeline.main(['--data-dir', tfds_dir, '--size', '32', '--batch', '4', '--warmup', '1', '--batches', '4',
                       '--json', str(out)])
  figures = json.loads(out.read_text())
  assert tuple(sorted(figures)) == tuple(sorted(input_pipeline.JSON_KEYS))
  assert figures['size'] == 32 and figures['workers'] == 0 and figures['cpu'] == common.cpu_model()
  assert figures['images_per_s'] > 0 and figures['cores'] > 0
  assert figures['images_per_s_per_core'] == pytest.approx(figures['images_per_s'] / figures['cores'])
  assert 'images/s per core' in capsys.readouterr().out


def test_input_pipeline_counts_worker_processes(tfds_dir):
  args = input_pipeline.parse_args(['--data-dir', tfds_dir, '--size', '32', '--batch', '4', '--workers', '1'])
  _, batches = input_pipeline.open_pipeline(input_pipeline.pipeline_config(args))
  try:
    result = input_pipeline.time_pipeline(batches, warmup=2, num_batches=6, seconds=0)
  finally:
    batches.close()
  assert result.images == 24 and result.batches == 6
  assert result.children_cpu_s > 0  # the worker made the batches, and its CPU time is counted
  assert result.cores == pytest.approx((result.own_cpu_s + result.children_cpu_s) / result.seconds)


def test_accelerator_table_arithmetic():
  per_core = {256: 80.0, 512: 25.0}
  rows = input_pipeline.accelerator_rows(per_core)
  assert [r['name'] for r in rows] == ['H100 / H200', 'TPU v5e', 'TPU v5p']
  for r in rows:
    for size in (256, 512):
      flops = input_pipeline.image_train_flops(size)
      assert r['images_per_s'][size] * flops == pytest.approx(0.4 * r['peak_tflops'] * 1e12)
      assert r['cores'][size] == pytest.approx(r['images_per_s'][size] / per_core[size])
  assert rows[0]['images_per_s'][256] == pytest.approx(27.3, abs=0.1)
  table = input_pipeline.accelerator_table(per_core, 'Some CPU')
  need = 8 * rows[0]['cores'][256]
  assert f'worker_count={math.ceil(need)}' in table and 'Some CPU' in table
  assert 'cores needed' not in input_pipeline.accelerator_table({})


def test_input_pipeline_errors(capsys, tmp_path):
  _error_line(capsys, input_pipeline.main, ['--size', '100'])
  _error_line(capsys, input_pipeline.main, ['--workers', '-1'])
  _error_line(capsys, input_pipeline.main, ['--data-dir', str(tmp_path), '--batches', '1'])  # nothing built there
  bad = tmp_path / 'bad.json'
  bad.write_text('{"size": 256}')
  _error_line(capsys, input_pipeline.main, ['--table', str(bad)])


# ---- gpu.py -----------------------------------------------------------------------------------------


def test_largest_fitting_batch_search():
  def search(limit, first, budget=1e9, max_batch=256):
    clock = iter(range(0, 10_000, 10))  # every try takes 10 "seconds"
    return gpu.largest_fitting_batch(lambda b: b <= limit, first, max_batch=max_batch, budget_s=budget,
                                     clock=lambda: next(clock))

  for limit, first in ((37, 30), (36, 50), (5, 1), (300, 8)):
    found, tries = search(limit, first)
    assert min(limit, 256) * 7 / 8 <= found <= min(limit, 256)
    assert all(t['fits'] == (t['batch'] <= limit) for t in tries)
  assert search(0, 4)[0] == 0  # nothing fits
  _, tries = search(1000, 1, budget=35)  # grows by 10% a try, but the budget stops it
  assert len(tries) <= 3
  assert gpu.is_out_of_memory(RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate'))
  assert not gpu.is_out_of_memory(ValueError('shapes do not match'))


def test_gpu_tiny_run(tmp_path):
  """The whole GPU script on the CPU, in its own process (which must not import what the GPU image lacks)."""
  pytest.importorskip('torch')
  pytest.importorskip('dsntnn')
  code = ('import sys; from benchmarks import gpu; gpu.main(sys.argv[1:]); '
          "print('imported:', [m for m in ('grain', 'tensorflow_datasets', 'orbax') if m in sys.modules])")
  proc = subprocess.run([sys.executable, '-c', code, '--tiny', '--out', str(tmp_path), '--peak-tflops', '0.05,0.1'],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'imported: []' in proc.stdout
  report = json.loads((tmp_path / 'gpu.json').read_text())
  assert report['tiny'] and report['peak_tflops'] == {'float32': 0.05, 'bfloat16': 0.1}
  assert not report['notes'], report['notes']
  rows = report['rows']
  assert {(r['task'], r['side'], r['dtype']) for r in rows if r['size'] == 16} == {
      (t, s, d) for t in ('train', 'inference') for s in ('kpjax', 'torch') for d in ('float32', 'bfloat16')}
  for r in rows:
    w = common.Workload(size=r['size'], batch=r['batch'], width=r['width'], num_stages=r['num_stages'])
    flops = w.train_flops() if r['task'] == 'train' else w.forward_flops()
    assert r['s_per_step'] > 0 and r['s_per_step_median'] >= r['s_per_step']
    assert r['tflop_per_step'] == pytest.approx(flops / 1e12)
    assert r['mfu'] == pytest.approx(flops / r['s_per_step'] / (report['peak_tflops'][r['dtype']] * 1e12))
    assert r['images_per_s'] == pytest.approx(r['batch'] / r['s_per_step'])
    if r['side'] == 'kpjax':
      assert r['compile_s'] > 0 and r['xla_gb'] > 0
  assert len(report['ratios']) == 4
  for ratio in report['ratios']:
    pair = {r['side']: r for r in rows if (r['task'], r['size'], r['dtype']) == (ratio['task'], ratio['size'],
                                                                                   ratio['dtype'])}
    assert ratio['kpjax_over_torch'] == pytest.approx(pair['torch']['s_per_step'] / pair['kpjax']['s_per_step'])
  search = report['batch_search']
  searched = [r for r in rows if r['size'] == 32]
  assert search['largest_batch'] >= 1 and search['per_image_gb'] > 0
  assert len(searched) == 1 and searched[0]['batch'] == search['largest_batch'] and searched[0]['remat']
  markdown = (tmp_path / 'gpu.md').read_text()
  assert '| task' in markdown and 'kpjax/torch speed ratio' in markdown and 'largest batch that fits' in markdown


def test_gpu_refuses_without_a_gpu_or_with_bad_flags(capsys, tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  for name in ('XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION'):
    monkeypatch.delenv(name, raising=False)  # undone at the end, whatever gpu.main sets meanwhile
  if jax.default_backend() == 'cpu':
    _error_line(capsys, gpu.main, ['--out', str(tmp_path / 'out'), '--no-torch'])
    assert not (tmp_path / 'out').exists()
  _error_line(capsys, gpu.main, ['--tiny', '--peak-tflops', '989'])
  (tmp_path / 'file').write_text('')
  _error_line(capsys, gpu.main, ['--tiny', '--out', str(tmp_path / 'file')])
