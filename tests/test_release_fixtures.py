"""What kpjax 0.1.0 wrote still loads, runs and resumes (tests/fixtures/release-0.1.0, see its README).

The fixtures are a converted model directory (kpdem conventions) and a training workdir (kpjax
conventions, checkpoints at steps 2 and 4), each with the coordinates 0.1.0 computed for one input.
Nothing here writes into tests/fixtures: runs that write work on copies under tmp_path.

Tolerance on coordinates: today's and 0.1.0's coordinates are two float32 evaluations of one computation
(same parameters, same input, direct convolutions), which may sum in other orders (another XLA, another
CPU). Each lies within float32 rounding of the exact value. That rounding is measured here on the same
input, as the larger distance to the torch network in float64 of kpjax's float32 result and of torch's
own float32 result (two independent float32 implementations). Two such evaluations differ by at most
twice that, and we allow twice that again: 4x the measured spread. The coordinates spread over more than
100x the tolerance, so the comparison is not vacuous.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import train_fixture as fx
from kpjax.cli import evaluate as evaluate_cli
from kpjax.cli import export as export_cli
from kpjax.cli import predict as predict_cli
from kpjax.configs import base
from kpjax.data import conventions
from kpjax.data import keypoints as kp
from kpjax.data import pipeline
from kpjax.data import sources
from kpjax.data.spec import ModelSpec
from kpjax.errors import ConfigError
from kpjax.inference import checkpoints
from kpjax.inference import predictor
from kpjax.train import config_check
from kpjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'release-0.1.0')
CONVERTED, WORKDIR = 'converted_trousers', 'workdir_trousers'
# What the fixtures' README says each one is, written out by hand.
SPECS = {
    CONVERTED: ModelSpec('trousers', 0.03125, 2, 64, conventions.KpdemConvention(targets='truncated')),
    WORKDIR: ModelSpec('trousers', 0.03125, 1, 32, conventions.KpjaxConvention()),
}
# The workdir's run: train_fixture's config as 0.1.0 trained it (its stored config says the same).
RUN = dict(total_steps=4, eval_every_steps=2, checkpoint_every_steps=2, num_vis_images=0, **{'model.width': 0.03125})


def _path(name: str) -> str:
  return os.path.join(FIXTURES, name)


def _coords(model, variables, images) -> np.ndarray:
  """The model's coordinates, jitted (op-by-op `apply` is several times slower on a CPU)."""
  return np.asarray(predictor.make_predict_fn(model)(variables, images))


def _config(spec: ModelSpec):
  """A config describing `spec`'s model (direct convolutions: what the references were computed with)."""
  config = base.get_config()
  config.category, config.input_size = spec.category, spec.input_size
  config.model.width, config.model.num_stages = spec.width, spec.num_stages
  config.preprocessing = spec.convention.name
  config.model.conv_algorithm = 'direct'
  return config


def _config_flags(spec: ModelSpec) -> list[str]:
  """The same model as CLI flags over configs/trousers.py."""
  return ['--config', os.path.join(ROOT, 'configs', 'trousers.py'), f'--config.model.width={spec.width}',
          f'--config.model.num_stages={spec.num_stages}', f'--config.input_size={spec.input_size}',
          f'--config.preprocessing={spec.convention.name}']


@pytest.fixture(scope='module')
def references():
  """{name: (images, 0.1.0's coords, coordinate tolerance)} (the tolerance: see the module docstring)."""
  import torch_reference  # pylint: disable=g-import-not-at-top  (torch: tests only)
  from convert import flax_to_torch  # pylint: disable=g-import-not-at-top
  from convert import torch_model  # pylint: disable=g-import-not-at-top
  out = {}
  for name, spec in SPECS.items():
    with np.load(_path(f'{name}_reference.npz')) as ref:
      images, coords = ref['images'], ref['coords']
    variables, _ = checkpoints.load_model(_path(name))
    ours = _coords(spec.build('direct'), variables, images).astype(np.float64)
    net = torch_model.CoordRegression(spec.n_locations, width=spec.width, num_stages=spec.num_stages)
    net.load_state_dict(flax_to_torch.variables_to_state_dict(variables))
    torch32 = torch_reference.torch_forward(net.eval(), images)[0]
    exact = torch_reference.torch_forward(net.double(), images)[0]
    spread = max(np.abs(ours - exact).max(), np.abs(torch32 - exact).max())
    tolerance = 4 * max(spread, np.spacing(np.float32(np.abs(exact).max())))  # never below 4 ulp of the coords
    assert np.ptp(exact) > 100 * tolerance, (name, np.ptp(exact), tolerance)  # not vacuous
    out[name] = images, coords, tolerance
  return out


@pytest.mark.parametrize('name', [CONVERTED, WORKDIR])
def test_metadata_reads_into_the_same_model_spec(name):
  spec = SPECS[name]
  metadata = checkpoints.read_metadata(_path(name))
  assert checkpoints.check_metadata(metadata) == spec
  assert checkpoints.load_model(_path(name))[1] == metadata
  ModelSpec.from_config(_config(spec)).check_matches(spec)  # a config of that model agrees on every field
  if name == CONVERTED:
    assert checkpoints.locate(_path(name)).kind == 'model'
    assert metadata['converter'] == 'convert.torch_to_flax' and metadata['source'] == 'trousers_slim.pth'
  else:
    location = checkpoints.locate(_path(name))
    assert (location.kind, location.workdir, location.step) == ('training', _path(name), 4)
    assert metadata['step'] == 4 and metadata['config']['model.width'] == 0.03125
    assert metadata['config']['total_steps'] == 4


@pytest.mark.parametrize('name', [CONVERTED, WORKDIR])
def test_loads_and_reproduces_the_reference_coords(name, references):
  images, want, tolerance = references[name]
  model, variables, spec, _ = predictor.load_predictor(_path(name), _config(SPECS[name]))
  assert spec == SPECS[name] and model.conv_algorithm == 'direct'
  checkpoints.check_fits(model, variables, name)
  got = _coords(model, variables, images)
  np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
  # Without a config: the checkpoint alone describes the model.
  model, variables, spec, _ = predictor.load_predictor(_path(name))
  assert spec == SPECS[name]
  np.testing.assert_allclose(_coords(model, variables, images), want, rtol=0, atol=tolerance)


def test_the_workdirs_step_2_checkpoint_loads_too():
  for path in (_path(WORKDIR), os.path.join(_path(WORKDIR), 'checkpoints', '2')):
    location = checkpoints.locate(path, step=2 if path == _path(WORKDIR) else None)
    assert (location.kind, location.workdir, location.step) == ('training', _path(WORKDIR), 2)
  variables, metadata = checkpoints.load_model(_path(WORKDIR), step=2)
  assert metadata['step'] == 2 and checkpoints.check_metadata(metadata) == SPECS[WORKDIR]
  checkpoints.check_fits(SPECS[WORKDIR].build(), variables, 'step 2')
  latest, _ = checkpoints.load_model(_path(WORKDIR))
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), variables, latest)
  assert max(jax.tree_util.tree_leaves(moved)) > 0  # two more steps of training changed the parameters
  assert checkpoints.training_steps(os.path.join(_path(WORKDIR), 'checkpoints')) == [2, 4]


def _write_images(root) -> dict[str, tuple[int, int]]:
  """Two trousers photos of other sizes than the inputs (landscape, portrait): {image_id: (height, width)}."""
  rng = np.random.default_rng(0)
  sizes = {'Images/trousers/a.png': (50, 70), 'Images/trousers/b.jpg': (90, 40)}
  for iid, (h, w) in sizes.items():
    path = root / iid
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  return sizes


@pytest.mark.parametrize('name', [CONVERTED, WORKDIR])
def test_predict_runs_on_both(name, tmp_path, capsys):
  sizes = _write_images(tmp_path)
  out = tmp_path / 'preds.csv'
  code = predict_cli.main(['--checkpoint', _path(name), '--images', str(tmp_path / 'Images'), '--out', str(out),
                           '--decimals', '3'])
  assert code == 0, capsys.readouterr().err
  with open(out, newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['image_id', 'image_category', *kp.KEYPOINT_NAMES]
  assert sorted(r[0] for r in rows[1:]) == sorted(sizes)
  # Each row is the model run by hand on the image, mapped to its pixels (the CSV rounds to 1e-3 px).
  model, variables, spec, _ = predictor.load_predictor(_path(name))
  trousers = kp.category_mask('trousers')
  for iid, category, *cells in rows[1:]:
    assert category == 'trousers'
    with Image.open(tmp_path / iid) as im:
      image = np.asarray(im.convert('RGB'))
    x, affine = spec.convention.prepare(image, spec.input_size)
    want = predictor.to_24(predictor.to_original(_coords(model, variables, x[None]), affine[None], spec),
                           'trousers')[0]
    for j, cell in enumerate(cells):
      if not trousers[j]:
        assert cell == '-1_-1_-1'
        continue
      px, py, v = cell.split('_')
      assert v == '1'
      np.testing.assert_allclose([float(px), float(py)], want[j], atol=1e-3, err_msg=f'{iid} {kp.KEYPOINT_NAMES[j]}')


@pytest.mark.parametrize('name', [CONVERTED, WORKDIR])
def test_export_runs_on_both(name, references, tmp_path, capsys):
  images, want, tolerance = references[name]
  spec = SPECS[name]
  out = tmp_path / f'{name}.stablehlo'
  code = export_cli.main(['--checkpoint', _path(name), '--format', 'stablehlo', '--out', str(out)])
  assert code == 0, capsys.readouterr().err
  coords, heatmaps = jax.export.deserialize(out.read_bytes()).call(images)
  np.testing.assert_allclose(np.asarray(coords), want, rtol=0, atol=tolerance)
  assert heatmaps.shape == (1, 7, spec.input_size, spec.input_size)
  info = json.loads((tmp_path / f'{name}.stablehlo.json').read_text())
  assert (info['category'], info['preprocessing'], info['input_size']) == ('trousers', spec.convention.name,
                                                                           spec.input_size)
  assert info['keypoints'] == list(kp.keypoint_names('trousers'))
  ort = pytest.importorskip('onnxruntime')
  out = tmp_path / f'{name}.onnx'
  code = export_cli.main(['--checkpoint', _path(name), '--format', 'onnx', '--out', str(out)])
  assert code == 0, capsys.readouterr().err
  session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
  np.testing.assert_allclose(session.run(None, {'images': images})[0], want, rtol=0, atol=tolerance)


def _logged(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _ne_tolerance(coord_tolerance: float) -> float:
  """How far the validation NE may move when every coordinate moves by `coord_tolerance` (normalised units).

  A 'kpjax' output c is input pixel ((c + 1) S - 1) / 2 and the letterbox scales the validation records'
  64 x 48 images by S / 64, so a coordinate error e moves a keypoint by at most e * 64 / 2 original pixels
  on each axis, sqrt(2) times that in distance; NE averages distance / (the image's waistband distance) over
  the visible keypoints, so it moves by at most that times the mean of 1 / waistband distance over them.
  """
  records = fx.RECORDS['validation']
  left, right = kp.normalization_indices('trousers')
  inverse = [1 / np.linalg.norm(r['keypoints'][left] - r['keypoints'][right]) for r in records
             for j in kp.keypoint_indices('trousers') if r['visibility'][j] == 1]
  assert all(r['height'] == 64 and r['width'] == 48 for r in records)
  return coord_tolerance * 64 / 2 * np.sqrt(2) * float(np.mean(inverse))


def test_evaluate_scores_the_workdir_as_0_1_0_logged(references, tmp_path, monkeypatch, capsys):
  fx.install_source(monkeypatch)
  logged = {r['step']: r for r in _logged(_path(WORKDIR)) if 'eval/ne' in r}
  tolerance = _ne_tolerance(references[WORKDIR][2])
  assert abs(logged[4]['eval/ne'] - logged[2]['eval/ne']) > tolerance  # the two steps are told apart
  for step in (None, 2):
    out = tmp_path / f'scores-{step}.json'
    argv = [*_config_flags(SPECS[WORKDIR]), '--checkpoint', _path(WORKDIR), '--json', str(out)]
    assert evaluate_cli.main(argv + (['--step', str(step)] if step else [])) == 0, capsys.readouterr().err
    scores = json.loads(out.read_text())
    want = logged[step or 4]
    assert scores['images'] == want['eval/images'] == 9
    assert scores['ne'] == pytest.approx(want['eval/ne'], rel=0, abs=tolerance)
    assert scores['ne/trousers'] == pytest.approx(want['eval/ne/trousers'], rel=0, abs=tolerance)


def _snapshot(root) -> dict[str, bytes]:
  return {os.path.relpath(os.path.join(r, f), root): open(os.path.join(r, f), 'rb').read()
          for r, _, files in os.walk(root) for f in files}


def test_extending_the_finished_run_is_refused_and_changes_nothing(tmp_path, monkeypatch):
  """Its stored config is read and compared: total_steps sets the learning-rate schedule, so a longer run
  would train something else (kpjax.train.config_check.RESUMABLE)."""
  fx.install_source(monkeypatch)
  workdir = tmp_path / 'w'
  shutil.copytree(_path(WORKDIR), workdir)
  before = _snapshot(workdir)
  with pytest.raises(ConfigError, match=r'config.total_steps: 4 when the run started, 6 now'):
    loop.train_and_evaluate(fx.tiny_config(**dict(RUN, total_steps=6)), str(workdir))
  assert _snapshot(workdir) == before


def test_resuming_from_its_step_2_checkpoint_retrains_steps_3_and_4_as_0_1_0_did(references, tmp_path,
                                                                                 monkeypatch):
  """From the step-2 checkpoint (its old input-pipeline state included) the run trains steps 3 and 4 on
  the batches of an uninterrupted stream and logs what 0.1.0 logged, each step once.

  Loss tolerance: the same float32 loss of the same batch and parameters (a mean over ~10^4 terms)
  rounds at ~1e-6 relative, and the parameters after two identical Adam steps differ by rounding only;
  another batch's loss differs by more than 5% (the logged losses range over 1.12 .. 1.28).
  """
  fx.install_source(monkeypatch)
  workdir = tmp_path / 'w'
  shutil.copytree(_path(WORKDIR), workdir)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  old = _logged(_path(WORKDIR))
  with open(workdir / 'checkpoints' / '2' / 'data' / 'metadata') as f:
    old_state = json.loads(json.load(f)['iterator'])
  assert 'grain' in old_state and old_state['batches'] == 2  # 0.1.0's format: grain's own state too

  seen = {'states': [], 'batches': []}
  real_set_state, real_next = pipeline.TrainIterator.set_state, pipeline.TrainIterator.__next__

  def set_state(self, state):
    seen['states'].append(state)
    real_set_state(self, state)

  def next_batch(self):
    batch = real_next(self)
    seen['batches'].append(batch)
    return batch

  monkeypatch.setattr(pipeline.TrainIterator, 'set_state', set_state)
  monkeypatch.setattr(pipeline.TrainIterator, '__next__', next_batch)
  config = fx.tiny_config(**RUN)
  result = loop.train_and_evaluate(config, str(workdir))
  assert result['step'] == 4 and seen['states'] == [old_state]
  fed = list(seen['batches'])

  # The batches of steps 3 and 4 are those an uninterrupted stream gives there, bit for bit.
  stream = fx.train_batches(config, sources.get_source(config.data, 'train'))
  expected = [next(stream) for _ in range(4)][2:]
  assert len(fed) == 2
  for got, want in zip(fed, expected):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  new = _logged(workdir)
  assert new[:4] == old[:4]  # the lines up to step 2 are kept as they were
  assert [(r['step'], 'train/loss' in r) for r in new] == [(r['step'], 'train/loss' in r) for r in old] == [
      (0, False), (1, True), (2, True), (2, False), (3, True), (4, True), (4, False)]
  for got, want in zip(new[4:], old[4:]):
    if 'train/loss' in want:
      for key in ('train/loss', 'train/euclidean', 'train/js', 'train/lr'):
        assert got[key] == pytest.approx(want[key], rel=1e-5), (got['step'], key)
    else:
      assert got['eval/ne'] == pytest.approx(want['eval/ne'], rel=0, abs=_ne_tolerance(references[WORKDIR][2]))
  assert checkpoints.training_steps(workdir / 'checkpoints') == [2, 4]
  with open(workdir / 'checkpoints' / '4' / 'data' / 'metadata') as f:
    assert json.loads(json.load(f)['iterator']) == {'batches': 4}
  # The resumed run's config is 0.1.0's, plus fields added since, each of which a resume may set (RESUMABLE).
  new, old = checkpoints.read_metadata(str(workdir))['config'], checkpoints.read_metadata(_path(WORKDIR))['config']
  assert {k: v for k, v in new.items() if k in old} == old
  assert set(new) - set(old) <= config_check.RESUMABLE
