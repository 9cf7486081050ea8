"""Every command-line tool reports a user's mistake the same way (kpjax.cli): one `error:` line on
stderr, exit status 2, no traceback, nothing written; config files and overrides go through
ml_collections' config flags, and a bug in a config file is reported with its file and line."""

from __future__ import annotations

import os

import pytest

from convert import flax_to_torch
from convert import torch_to_flax
from kpjax.cli import common as cli
from kpjax.train import config_check
from kpjax.inference import evaluation as evaluate
from kpjax.cli import export as export_cli
from kpjax.inference import prediction as predict
from kpjax.train import loop as train
from kpjax.configs import base
from kpjax.data import build
from kpjax.data import synthetic
from kpjax import errors
from kpjax.cli import train as train_cli
from kpjax.cli import evaluate as evaluate_cli
from kpjax.cli import predict as predict_cli
from kpjax.cli import build as build_cli
from kpjax.cli import synthetic as synthetic_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TROUSERS = os.path.join(REPO, 'configs', 'trousers.py')


def _status(main, argv) -> int:
  try:
    return main(argv)
  except SystemExit as e:  # argparse-level mistakes exit from the parser
    return e.code


# (CLI, argv (paths under {tmp}), what the error line must say). Each is a user's mistake of a different
# kind: a bad flag, a missing required flag, a bad config value or override, a missing input.
CASES = [
    (train_cli.main, ['--config', TROUSERS], '--workdir'),
    (train_cli.main, ['--config', TROUSERS, '--workdir', '{tmp}/w', '--config.batch_size=0'],
     'config.batch_size = 0: expected a positive integer'),
    (train_cli.main, ['--config', TROUSERS, '--workdir', '{tmp}/w', '--config.nope=1'], 'the config has no field nope'),
    (train_cli.main, ['--config', '{tmp}/missing.py', '--workdir', '{tmp}/w'], 'missing.py does not exist'),
    (train_cli.main, ['--config', TROUSERS, '--workdir', '{tmp}/w', '--unknown'], 'unrecognized arguments: --unknown'),
    (evaluate_cli.main, ['--annotations', '{tmp}/gt.csv'], 'needs both --annotations and --predictions'),
    (evaluate_cli.main, ['--annotations', '{tmp}/gt.csv', '--predictions', '{tmp}/p.csv'], 'gt.csv'),
    (evaluate_cli.main, ['--config.batch_size=2', '--annotations', 'a', '--predictions', 'b'],
     '--config.FIELD=VALUE overrides need --config FILE'),
    (predict_cli.main, ['--checkpoint', '{tmp}/none', '--images', '{tmp}', '--out', '{tmp}/p.csv', '--batch-size', '0'],
     '--batch-size must be at least 1'),
    (predict_cli.main, ['--checkpoint', '{tmp}/none', '--images', '{tmp}/x.jpg', '--out', '{tmp}/p.csv'],
     'no images to predict'),
    (export_cli.main, ['--checkpoint', '{tmp}/none', '--format', 'tflite', '--out', '{tmp}/m'], "unknown format 'tflite'"),
    (export_cli.main, ['--checkpoint', '{tmp}/none', '--format', 'stablehlo', '--out', '{tmp}/m'], 'does not exist'),
    (build_cli.main, ['--manual-dir', '{tmp}/nothing', '--data-dir', '{tmp}/tfds'], 'nothing'),
    (build_cli.main, ['--data-dir', '{tmp}/tfds'], '--manual-dir'),
    (synthetic_cli.main, ['--out', '{tmp}/s', '--num-images', '0'], 'num_images must be at least 1'),
    (synthetic_cli.main, ['--out', '{tmp}/s', '--num-images', 'many'], "invalid int value: 'many'"),
    (torch_to_flax.main, ['--config', TROUSERS, '--torch-checkpoint', '{tmp}/w.pt', '--out', '{tmp}/m'], 'w.pt'),
    (torch_to_flax.main, ['--config', TROUSERS, '--torch-checkpoint', 'w.pt', '--out', '{tmp}/m',
                          '--input-size', '61'], '--input-size = 61: expected a positive even number of pixels'),
    (flax_to_torch.main, ['--config', TROUSERS, '--checkpoint', '{tmp}/none', '--out', '{tmp}/m.pth'],
     'does not exist'),
    (flax_to_torch.main, ['--checkpoint', '{tmp}/none', '--out', '{tmp}/m.pth'], '--config'),
]


@pytest.mark.parametrize('main, argv, message', CASES, ids=lambda v: getattr(v, '__module__', None))
def test_a_users_mistake_is_one_error_line_and_writes_nothing(tmp_path, capsys, main, argv, message):
  (tmp_path / 'gt.csv').write_text('image_id,image_category\n')  # an annotation file that holds no images
  before = sorted(os.listdir(tmp_path))
  status = _status(main, [a.replace('{tmp}', str(tmp_path)) for a in argv])
  err = capsys.readouterr().err
  assert status == cli.USAGE_ERROR, err
  assert err.startswith('error: ') and len(err.strip().splitlines()) == 1, err
  assert message in err and 'Traceback' not in err, err
  assert sorted(os.listdir(tmp_path)) == before


def test_config_file_bugs_keep_their_file_and_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from kpjax.configs import base\n\n\ndef get_config():\n  config = base.get_config()\n'
                 '  config.batch_size = undefined_name\n  return config\n')
  with pytest.raises(cli.ConfigFileError, match=rf'{bad}, line 6: NameError: name .undefined_name. is not defined'):
    cli.load_config(str(bad))
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n  pass\n')
  with pytest.raises(cli.ConfigFileError, match=rf'{broken}, line 1: SyntaxError'):
    cli.load_config(str(broken))
  raising = tmp_path / 'raising.py'
  raising.write_text('def get_config():\n  raise ValueError("no such dataset")\n')
  with pytest.raises(cli.ConfigFileError, match=rf'{raising}, line 2: ValueError: no such dataset'):
    cli.load_config(str(raising))


def test_overrides_are_ml_collections_config_flags():
  config = cli.load_config(TROUSERS, ['--config.batch_size=8', '--config.augment.scale=(0.5,2.0)',
                                      '--config.remat', '--config.model.width', '0.5'])
  assert (config.batch_size, config.augment.scale, config.remat, config.model.width) == (8, (0.5, 2.0), True, 0.5)
  with pytest.raises(cli.ConfigFileError, match=r'bad config override \(--config.batch_size=abc\)'):
    cli.load_config(TROUSERS, ['--config.batch_size=abc'])
  with pytest.raises(cli.ConfigFileError, match='the config has no field nope'):
    cli.load_config(TROUSERS, ['--config.data.nope=1'])


def test_run_maps_failures_to_exit_statuses(capsys):
  def fails(error):
    def run():
      raise error
    return run

  assert cli.run(lambda: None) == cli.OK
  assert cli.run(fails(ValueError('bad\nvalue'))) == cli.USAGE_ERROR
  assert cli.run(fails(FileNotFoundError(2, 'No such file or directory', '/x/y'))) == cli.USAGE_ERROR
  assert cli.run(fails(cli.RunFailed('diverged'))) == cli.RUN_FAILED
  assert cli.run(fails(KeyboardInterrupt())) == cli.INTERRUPTED
  assert capsys.readouterr().err.splitlines() == [
      'error: bad value', 'error: /x/y: No such file or directory', 'error: diverged', 'error: interrupted']


def test_every_base_field_is_valid_and_each_rule_names_its_field():
  config_check.check_config(base.get_config())
  for field, bad in [('model.num_stages', 7), ('data.worker_count', -1), ('schedule', 'linear'),
                     ('augment.color_jitter', 1.0), ('kpdem_targets', 'floor'), ('model.conv_algorithm', 'fft')]:
    config = base.get_config()
    node = config
    *parents, leaf = field.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = bad
    with pytest.raises(errors.ConfigError, match=rf'^config\.{field} = {bad!r}: expected'):
      config_check.check_config(config)


def test_library_modules_define_no_flags_at_import():
  from absl import flags  # pylint: disable=g-import-not-at-top
  ours = {m: f for m, f in flags.FLAGS.flags_by_module_dict().items() if m.startswith(('kpjax', 'convert'))}
  assert not ours, ours
