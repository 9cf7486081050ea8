"""benchmarks/: each script's core at tiny sizes on the CPU, its figures' arithmetic, and its flag errors."""

import argparse
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import checkpoint_save
from benchmarks import common
from benchmarks import confidence
from benchmarks import gpu
from benchmarks import inference
from benchmarks import input_pipeline
from benchmarks import memory
from benchmarks import pool_unpool
from benchmarks import serve
from benchmarks import train_step
import serve_fixture as sf
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


# ---- train_step.py, inference.py, memory.py, checkpoint_save.py ---------------------------------------


def test_checkpoint_save_times_both_modes_and_saves_whole_checkpoints(tmp_path, capsys):
  from kpjax.inference import checkpoints
  import jax
  checkpoint_save.main(['--workdir', str(tmp_path / 'ckpt'), '--size', '16', '--batch', '2', '--width', '0.0625',
                        '--num-stages', '1', '--steps', '1', '--json', str(tmp_path / 'out.json')])
  rows = _table_rows(capsys.readouterr().out)
  figures = json.loads((tmp_path / 'out.json').read_text())
  w = common.Workload(size=16, batch=2, width=0.0625, num_stages=1)
  state_mb = sum(x.nbytes for x in jax.tree_util.tree_leaves(common.initial_train_state(w).as_dict())) / 1e6
  for mode in checkpoint_save.MODES:
    m = figures[mode]
    assert m['checkpoint_mb'] == pytest.approx(state_mb) and rows[mode][1] == f'{state_mb:.1f}'
    assert all(m[k] > 0 for k in ('step_s', 'step_with_save_s', 'save_complete_s'))  # no speeds compared
    assert checkpoints.training_steps(str(tmp_path / 'ckpt' / mode)) == [1, 2]  # both saves complete


def test_train_step_prints_table_machine_and_ratio(capsys):
  pytest.importorskip('torch')
  pytest.importorskip('dsntnn')
  train_step.main(TINY + ['--remat', '--unpool', 'both'])
  out = capsys.readouterr().out
  rows = _table_rows(out)
  kp, torch_row = rows['kpjax (remat)'], rows['torch']  # --remat is honoured, and the row says so
  scatter = rows['kpjax (scatter unpool, remat)']  # --unpool both: the scatter form too
  assert kp[1] == torch_row[1] == scatter[1] == 'float32'
  assert float(kp[2]) > 0 and float(torch_row[2]) > 0 and float(scatter[2]) > 0
  number = r'([0-9.e-]+)'
  unpool = re.search(rf'on (.+): scatter/mask unpool time ratio \(float32\): {number}x best, {number}x median '
                     rf'\(mask {number} s/step best, {number} median; scatter {number} best, {number} median\)', out)
  assert unpool and common.cpu_model() in unpool.group(1)
  assert [float(unpool.group(i)) for i in (4, 5, 6, 7)] == [float(c) for c in kp[2:4] + scatter[2:4]]
  assert float(unpool.group(2)) == pytest.approx(float(scatter[2]) / float(kp[2]), abs=0.006, rel=0.002)
  assert common.cpu_model() in out  # the table names the CPU
  ratio = re.search(r'on (.+): kpjax/torch speed ratio \(float32\): ([0-9.]+)x \(kpjax ([0-9.]+) s/step, '
                    r'torch ([0-9.]+) s/step\)', out)
  assert ratio and common.cpu_model() in ratio.group(1)
  assert float(ratio.group(3)) == float(kp[2]) and float(ratio.group(4)) == float(torch_row[2])
  assert float(ratio.group(2)) == pytest.approx(float(ratio.group(4)) / float(ratio.group(3)), abs=0.006, rel=0.002)


def test_inference_times_forward_and_rejects_remat(capsys):
  pytest.importorskip('torch')
  pytest.importorskip('dsntnn')
  inference.main(TINY + ['--no-torch', '--unpool', 'scatter'])
  out = capsys.readouterr().out
  assert 'kpjax inference (forward) vs PyTorch' in out
  w = common.Workload(size=16, batch=2, width=0.0625, num_stages=1)
  assert f'{w.forward_flops() / 1e9:.1f} GFLOP per step' in out
  rows = _table_rows(out)
  assert float(rows['kpjax (scatter unpool)'][2]) > 0 and 'kpjax' not in rows  # the scatter form only
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


@pytest.mark.parametrize('argv', [['--size', '21'], ['--batch', '0'], ['--num-stages', '7'], ['--width', '-1'],
                                  ['--category', 'hats'], ['--dtype', 'float16'], ['--unpool', 'gather']])
def test_comparison_flag_errors(capsys, argv):
  _error_line(capsys, train_step.main, argv)


def test_input_sides_are_the_networks():
  """The benchmarks take every side the network takes (kpjax.model.layers.INPUT_SIDE_RULE), and no other."""
  assert [common.input_size(s) for s in ('2', '20', '100', '256')] == [2, 20, 100, 256]
  for side in ('21', '0', '-4', 'x'):
    with pytest.raises(argparse.ArgumentTypeError):
      common.input_size(side)


def test_kpjax_config_runs_the_workloads_unpool():
  from kpjax.model import pooling  # pylint: disable=g-import-not-at-top
  from kpjax.train import step as ts  # pylint: disable=g-import-not-at-top
  assert common.UNPOOLS == pooling.UNPOOLS  # common keeps its own copy so that it imports no JAX
  for unpool in common.UNPOOLS:
    w = common.Workload(size=16, batch=2, width=0.0625, num_stages=1, unpool=unpool)
    assert ts.build_model(common.kpjax_config(w)).unpool == unpool


def test_pool_unpool_times_both_forms_and_passes(capsys):
  pool_unpool.main(['--shape', '2,8,6,3', '--dtype', 'both', '--repeats', '1', '--warmup', '0', '--min-quiet', '0',
                    '--quiet-wait-s', '0'])
  out = capsys.readouterr().out
  rows = [line.split('|')[1:-1] for line in out.splitlines() if line.startswith('| ') and 'unpool' not in line]
  cells = {(r[0].strip(), r[1].strip(), r[2].strip()): [float(c) for c in r[3:]] for r in rows}
  assert set(cells) == {(u, p, d) for u in common.UNPOOLS for p in pool_unpool.PASSES for d in common.DTYPES}
  assert all(best > 0 and median >= best and gbs > 0 for best, median, gbs in cells.values())
  for what in pool_unpool.PASSES:
    for dtype in common.DTYPES:
      ratio = re.search(rf'pool/unpool {re.escape(what)} \({dtype}\) on .*: scatter/mask time ratio ([0-9.]+)x best',
                        out)
      want = cells[('scatter', what, dtype)][0] / cells[('mask', what, dtype)][0]
      assert ratio and float(ratio.group(1)) == pytest.approx(want, rel=0.02, abs=0.006)
  arrays = {'forward': 2, 'forward + backward': 4}
  for (_, what, dtype), (best, _, gbs) in cells.items():  # GB/s: the arrays read and written once
    itemsize = 2 if dtype == 'bfloat16' else 4
    assert gbs == pytest.approx(arrays[what] * 2 * 8 * 6 * 3 * itemsize / 1e9 / best, rel=0.01)
  _error_line(capsys, pool_unpool.main, ['--shape', '2,7,6,3'])
  _error_line(capsys, pool_unpool.main, ['--shape', '2,8,6'])


def test_memory_remat_keeps_less(capsys):
  w = common.Workload(size=16, batch=2, width=0.0625, num_stages=1)
  off = memory.compiled_memory(w).temp_size_in_bytes
  on = memory.compiled_memory(w.replace(remat=True)).temp_size_in_bytes
  assert 0 < on < off
  _error_line(capsys, memory.main, ['--sizes', '256,13'])
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
  _error_line(capsys, input_pipeline.main, ['--size', '101'])
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
  assert sorted((r['task'], r['side'], r['dtype'], r['unpool'] or '') for r in rows if r['size'] == 16) == sorted(
      [(t, 'torch', d, '') for t in ('train', 'inference') for d in ('float32', 'bfloat16')]
      + [(t, 'kpjax', d, u) for t in ('train', 'inference') for d in ('float32', 'bfloat16') for u in common.UNPOOLS])
  for r in rows:
    w = common.Workload(size=r['size'], batch=r['batch'], width=r['width'], num_stages=r['num_stages'])
    flops = w.train_flops() if r['task'] == 'train' else w.forward_flops()
    assert r['s_per_step'] > 0 and r['s_per_step_median'] >= r['s_per_step']
    assert r['tflop_per_step'] == pytest.approx(flops / 1e12)
    assert r['mfu'] == pytest.approx(flops / r['s_per_step'] / (report['peak_tflops'][r['dtype']] * 1e12))
    assert r['images_per_s'] == pytest.approx(r['batch'] / r['s_per_step'])
    if r['side'] == 'kpjax':
      assert r['compile_s'] > 0 and r['xla_gb'] > 0
  assert len(report['ratios']) == len(report['unpool_ratios']) == 4
  for ratio in report['ratios'] + report['unpool_ratios']:
    same = {r['unpool'] or r['side']: r for r in rows if (r['task'], r['size'], r['dtype']) == (
        ratio['task'], ratio['size'], ratio['dtype'])}
    if 'kpjax_over_torch' in ratio:  # against the fused (mask) form
      assert ratio['kpjax_over_torch'] == pytest.approx(same['torch']['s_per_step'] / same['mask']['s_per_step'])
    else:
      assert ratio['scatter_over_mask'] == pytest.approx(same['scatter']['s_per_step'] / same['mask']['s_per_step'])
  part = report['pool_unpool']
  assert part['shape'] == [2, 16, 16, 4] and len(part['rows']) == 8 and len(part['ratios']) == 4
  assert {(r['unpool'], r['pass'], r['dtype']) for r in part['rows']} == {
      (u, p, d) for u in common.UNPOOLS for p in pool_unpool.PASSES for d in common.DTYPES}
  search = report['batch_search']
  searched = [r for r in rows if r['size'] == 32]
  assert search['largest_batch'] >= 1 and search['per_image_gb'] > 0
  assert len(searched) == 1 and searched[0]['batch'] == search['largest_batch'] and searched[0]['remat']
  markdown = (tmp_path / 'gpu.md').read_text()
  assert '| task' in markdown and 'kpjax/torch speed ratio' in markdown and 'largest batch that fits' in markdown
  assert 'scatter/mask unpool time ratio' in markdown and 'The pool + unpool pair alone, NHWC 2x16x16x4' in markdown


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


# ---- serve.py -----------------------------------------------------------------------------------------


def test_serve_tiny_run(tmp_path, capsys):
  """The whole serving benchmark at tiny sizes: a real server process, its table and JSON's arithmetic."""
  pytest.importorskip('uvicorn', reason="the serve extra (pip install 'kpjax[serve]') is not installed")
  out = tmp_path / 'serve.json'
  report = serve.main(['--tiny', '--clients', '1,3', '--json', str(out)])
  text = capsys.readouterr().out
  figures = json.loads(out.read_text())
  assert figures == json.loads(json.dumps(report)) and tuple(sorted(figures)) == tuple(sorted(serve.JSON_KEYS))
  assert figures['cpu'] == common.cpu_model() and common.cpu_model() in text
  assert figures['max_batch'] == 2 and set(figures['bare_forward_ms_per_image']) == {'1', '2'}
  assert [r['clients'] for r in figures['rows']] == [1, 3] and figures['goal'] is None  # no 16-client row
  assert len(figures['rounds']) == 2  # --tiny: one round
  table = _table_rows(text)
  for r in figures['rows']:
    assert r['requests'] == 24 and r['rounds'] == 1
    (one,) = [x for x in figures['rounds'] if x['clients'] == r['clients']]
    assert r['requests_per_s'] == pytest.approx(one['requests'] / one['seconds'])
    assert r['ms_per_image'] == pytest.approx(1e3 * one['seconds'] / one['requests'])
    assert 0 < r['p50_ms'] <= r['p99_ms'] and 1 <= r['mean_batch'] <= 2 and r['server_forward_ms_per_image'] > 0
    assert r['vs_bare'] == pytest.approx(r['ms_per_image'] / r['bare_ms_per_image'] - 1)
    assert table[str(r['clients'])][1] == f'{r["requests_per_s"]:.1f}'
  assert figures['rows'][0]['mean_batch'] == 1.0  # one client: one image a batch


def test_serve_percentiles_and_flag_errors(capsys):
  values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
  for q in (0, 50, 90, 99, 100):
    assert serve.percentile(values, q) == pytest.approx(np.percentile(values, q))
  for argv in (['--clients', '0'], ['--clients', 'a,b'], ['--requests', '0'], ['--size', '21']):
    _error_line(capsys, serve.main, argv)


# ---- confidence.py ------------------------------------------------------------------------------------


def test_auroc_is_mann_whitney():
  assert confidence.auroc([0.9, 0.8], [0.1, 0.8]) == 0.875  # 3 pairs won, 1 tied, of 4
  assert confidence.auroc([3.0], [1.0, 2.0]) == 1.0 and confidence.auroc([1.0, 2.0], [3.0]) == 0.0
  assert math.isnan(confidence.auroc([1.0], []))


def test_confidence_tiny_run(tmp_path, capsys):
  """Labels from the renderer's own visibility; every keypoint of every garment's category counted once."""
  from kpjax.data import keypoints as kp  # pylint: disable=g-import-not-at-top
  from kpjax.data.synthetic import garments  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'c.json'
  result = confidence.main(['--checkpoint', sf.small_model(str(tmp_path / 'm')), '--num-images', '12',
                            '--seed', '7', '--json', str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  samples = confidence.garments_with_labels(12, 7)
  visible = 0
  for i, (category, image, labels) in enumerate(samples):
    rng = np.random.default_rng(np.random.SeedSequence([7, i]))
    assert kp.CATEGORIES[int(rng.integers(len(kp.CATEGORIES)))] == category
    example = garments.render(category, rng)  # the same garment, drawn again
    np.testing.assert_array_equal(image, example.image)
    v = example.visibility[kp.keypoint_indices(category)]
    assert [labels[n] == 'visible' for n in kp.keypoint_names(category)] == list(v == 1)
    assert [labels[n] == 'occluded' for n in kp.keypoint_names(category)] == list(v == 0)
    visible += int((v == 1).sum())
  assert result['counts']['visible'] == visible
  assert sum(result['counts'].values()) == sum(kp.num_keypoints(c) for c, _, _ in samples)
  for value in result['auroc'].values():
    assert math.isnan(value) or 0 <= value <= 1
  assert 'AUROC visible vs occluded or cropped off' in capsys.readouterr().out
