"""config.init_backbone: torchvision's VGG19 ImageNet weights fill exactly KPDEM's 14 VGG layers (OIHW ->
HWIO), everything else keeps its fresh initialisation; other files and networks are refused by name,
before the workdir is touched; backbone_lr_multiplier trains those layers slower after global clipping.

The VGG state dicts are built here with torchvision's keys and shapes (random VGG19 convs; a small
classifier). The other VGGs are saved as expanded (stride-0) tensors, so that their files stay tiny.
"""

import collections
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import train_fixture as fx
from convert import torch_model
from kpjax.model import vgg19 as backbone
from kpjax.inference import checkpoints as ckpt_lib
from kpjax.train import config_check
from kpjax.model import network as kpmodel
from kpjax.train import loop as train
from kpjax.train import step as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VGG19 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512, 512, 'M')
VGG16 = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')
# The correspondence the issue states, written out independently of kpjax.model.vgg19's derivation.
KPDEM_FROM_VGG19 = {'conv1_1': 0, 'conv1_2': 2, 'conv2_1': 5, 'conv2_2': 7, 'conv3_1': 10, 'conv3_2': 12,
                    'conv3_3': 14, 'conv3_4': 16, 'conv4_1': 19, 'conv4_2': 21, 'conv4_3': 23, 'conv4_4': 25,
                    'conv5_1': 28, 'conv5_2': 30}


def torchvision_layout(cfg, batch_norm=False, random=True) -> collections.OrderedDict:
  """torchvision's VGG state dict for `cfg`: features.N numbered as its make_layers does (conv, [BN], ReLU;
  'M' a max-pool), then a small stand-in classifier."""
  g = torch.Generator().manual_seed(0)
  tensor = (lambda *shape: torch.randn(*shape, generator=g) * 0.05) if random else (
      lambda *shape: torch.zeros(1).expand(*shape))
  state, n, channels = collections.OrderedDict(), 0, 3
  for v in cfg:
    if v == 'M':
      n += 1
      continue
    state[f'features.{n}.weight'], state[f'features.{n}.bias'] = tensor(v, channels, 3, 3), tensor(v)
    if batch_norm:
      for name in ('weight', 'bias', 'running_mean', 'running_var'):
        state[f'features.{n + 1}.{name}'] = tensor(v)
      state[f'features.{n + 1}.num_batches_tracked'] = torch.tensor(0)
    n, channels = n + (3 if batch_norm else 2), v
  for i in (0, 3, 6):
    state[f'classifier.{i}.weight'], state[f'classifier.{i}.bias'] = tensor(10, 16), tensor(10)
  return state


@pytest.fixture(scope='module')
def vgg19(tmp_path_factory):
  """(state dict, {'legacy': path, 'zip': path}): the legacy one is the format of torchvision's own file."""
  state = torchvision_layout(VGG19)
  folder = tmp_path_factory.mktemp('vgg19')
  paths = {'legacy': str(folder / 'vgg19-legacy.pth'), 'zip': str(folder / 'vgg19-zip.pth')}
  torch.save(state, paths['legacy'], _use_new_zipfile_serialization=False)
  torch.save(state, paths['zip'])
  return state, paths


@pytest.fixture(scope='module')
def fresh():
  """Stand-in fresh float32 parameters of a full-width one-stage network (random values of the network's
  shapes: loading is pure over the tree, and this spares compiling the real initialisation)."""
  model = kpmodel.CoordRegressionNetwork(7, width=1.0, num_stages=1)
  shapes = jax.eval_shape(lambda: kpmodel.init_variables(model, jax.random.key(0), 8))['params']
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)


def _flat(params) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(p.key for p in path): np.asarray(leaf) for path, leaf in leaves}


def check_backbone_loaded(params, state, fresh_params) -> None:
  """The 14 VGG layers hold the file's values (OIHW -> HWIO); every other leaf is bit-identical to fresh."""
  got, before = _flat(params), _flat(fresh_params)
  assert got.keys() == before.keys()
  copied = set()
  for block, layers in kpmodel.BACKBONE:
    for name, _, _ in layers:
      if name in KPDEM_FROM_VGG19:
        n = KPDEM_FROM_VGG19[name]
        np.testing.assert_array_equal(got[('fcn', block, name, 'kernel')],
                                      state[f'features.{n}.weight'].numpy().transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(got[('fcn', block, name, 'bias')], state[f'features.{n}.bias'].numpy())
        copied |= {('fcn', block, name, 'kernel'), ('fcn', block, name, 'bias')}
  assert len(copied) == 28
  for key in got.keys() - copied:
    assert got[key].dtype == np.float32
    np.testing.assert_array_equal(got[key], before[key], err_msg=str(key))


def test_the_layer_table_is_vgg19s():
  assert [(name, n) for name, n, _ in backbone.pretrained_layers()] == list(KPDEM_FROM_VGG19.items())
  assert [n for _, n, _, _ in backbone.vgg19_convs()] == [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
  assert backbone.pretrained_layers()[-1][2] == ('fcn', 'model1_0_3', 'conv5_2')


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_vgg19_fills_exactly_the_14_layers(vgg19, fresh, fmt):
  state, paths = vgg19
  loaded = backbone.copy_into(fresh, backbone.read_vgg19(paths[fmt]))
  check_backbone_loaded(loaded, state, fresh)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(fresh)


def test_torchvisions_own_vgg19_layout():
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except  (PyPI's build fails to load beside torch's CPU build)
    pytest.skip(f'torchvision unavailable: {type(e).__name__}: {e}')
  shapes = lambda m: {k: np.zeros(v.shape, np.float32) for k, v in m.state_dict().items()}
  backbone.check_vgg19(shapes(torchvision.models.vgg19()), 'vgg19')
  for other in (torchvision.models.vgg16(), torchvision.models.vgg19_bn()):
    with pytest.raises(backbone.BackboneError):
      backbone.check_vgg19(shapes(other), 'other')


def _save(tmp_path, name, obj, legacy=False) -> str:
  path = str(tmp_path / name)
  torch.save(obj, path, **({'_use_new_zipfile_serialization': False} if legacy else {}))
  return path


def test_other_files_are_refused_naming_what_is_wrong(vgg19, tmp_path):
  state, paths = vgg19
  kpdem = torch_model.CoordRegression(7, width=0.125, num_stages=1)
  wrong_shape = torchvision_layout(VGG19, random=False)
  wrong_shape['features.34.weight'] = torch.zeros(1).expand(256, 512, 3, 3)
  resnet = {'conv1.weight': torch.zeros(64, 3, 7, 7), 'bn1.running_mean': torch.zeros(64),
            'layer1.0.conv1.weight': torch.zeros(64, 64, 3, 3), 'fc.weight': torch.zeros(10, 512)}
  with open(paths['legacy'], 'rb') as f:
    head = f.read(5_000_000)
  cases = {
      'vgg16.pth': (torchvision_layout(VGG16, random=False),
                    r'13 convolutions, at features.\[0, 2, 5, 7, 10, 12, 14, 17, .* \(that is VGG16\); VGG19 has 16.*'
                    r'missing: features.16.weight'),
      'vgg19_bn.pth': (torchvision_layout(VGG19, batch_norm=True, random=False),
                       r'BatchNorm statistics \(features.1.running_mean.*vgg19_bn.*vgg19-dcbb9e9d.pth'),
      'wrong_shape.pth': (wrong_shape, r'shape mismatches: features.34.weight \(256, 512, 3, 3\) \(VGG19: \(512, 512'),
      'resnet.pth': (resnet, r'no features.N.weight keys \(found bn1.running_mean, conv1.weight'),
      'kpdem.pth': (kpdem.state_dict(), r'is a KPDEM checkpoint \(fcn.model1_0_0.conv1_1.weight.*convert.torch_to_flax'
                                        r'.*config.init_from'),
  }
  for name, (obj, match) in cases.items():
    with pytest.raises(backbone.BackboneError, match=match):
      backbone.read_vgg19(_save(tmp_path, name, obj))
  with pytest.raises(backbone.BackboneError,
                     match=r'whole pickled KPDEM model \(convert.torch_model.CoordRegression.*config.init_from'):
    backbone.read_vgg19(_save(tmp_path, 'kpdem_module.pth', torch.nn.DataParallel(kpdem), legacy=True))
  (tmp_path / 'cut.pth').write_bytes(head)
  with pytest.raises(backbone.BackboneError, match=r'config.init_backbone: .*cut.pth is (damaged or )?truncated.*'
                                                   'download complete'):
    backbone.read_vgg19(str(tmp_path / 'cut.pth'))
  with pytest.raises(backbone.BackboneError, match='does not exist'):
    backbone.read_vgg19(str(tmp_path / 'missing.pth'))


def test_a_network_of_another_width_is_refused_naming_the_first_layer(vgg19):
  weights = backbone.read_vgg19(vgg19[1]['zip'])
  slim = kpmodel.CoordRegressionNetwork(7, width=0.5, num_stages=1)
  with pytest.raises(backbone.BackboneError, match=r'conv1_1 \(params/fcn/model1_0_0/conv1_1/kernel\) is '
                                                   r'\(3, 3, 3, 32\) in this network but \(3, 3, 3, 64\) in VGG19.*'
                                                   'config.model.width = 1'):
    backbone.read_for_model(vgg19[1]['zip'], slim)
  backbone.read_for_model(vgg19[1]['zip'], kpmodel.CoordRegressionNetwork(13, num_stages=6))  # fits every size
  with pytest.raises(backbone.BackboneError, match='conv1_1'):
    backbone.copy_into(jax.eval_shape(lambda: kpmodel.init_variables(slim, jax.random.key(0), 8))['params'], weights)


# ---- Training ----------------------------------------------------------------------------------------

def _config(**overrides):
  """The full-width network (the backbone must be) kept cheap: one stage, 8x8 inputs, batches of 1 and 2
  evaluation images; learning rate 0, so that step 1 keeps the weights step 0 started from."""
  base = {'model.width': 1.0, 'input_size': 8, 'batch_size': 1, 'eval_batch_size': 2, 'data.num_eval_images': 2,
          'total_steps': 1, 'learning_rate': 0.0, 'warmup_steps': 0, 'schedule': 'constant', 'num_vis_images': 0}
  return fx.tiny_config(**{**base, **overrides})


def test_training_starts_from_vgg19_and_resuming_ignores_it(vgg19, tmp_path, monkeypatch, capsys):
  state, paths = vgg19
  fx.install_source(monkeypatch)
  created = []  # the run's own fresh initialisation
  create = ts.create_train_state
  monkeypatch.setattr(ts, 'create_train_state', lambda *a, **k: created.append(jax.device_get(create(*a, **k))) or
                      created[-1])
  workdir = str(tmp_path / 'run')
  config = _config(init_backbone=paths['legacy'], backbone_lr_multiplier=0.5)
  assert train.train_and_evaluate(config, workdir)['step'] == 1
  assert 'backbone: conv1_1 .. conv5_2 from' in capsys.readouterr().out
  variables, _ = ckpt_lib.load_model(workdir)  # step 1 at learning rate 0: the weights training started from
  check_backbone_loaded(variables['params'], state, created[0].params)
  # resuming: the checkpoint wins, the file is not even read
  result = train.train_and_evaluate(_config(init_backbone=str(tmp_path / 'gone.pth'), backbone_lr_multiplier=0.5),
                                    workdir)
  assert result['step'] == 1
  assert 'config.init_backbone is ignored (the checkpoint wins)' in capsys.readouterr().out


def test_refusals_in_training_write_nothing(vgg19, tmp_path, monkeypatch):
  fx.install_source(monkeypatch)
  vgg16 = _save(tmp_path, 'vgg16.pth', torchvision_layout(VGG16, random=False), legacy=True)
  existing = tmp_path / 'existing'
  existing.mkdir()
  cases = [
      (_config(init_backbone=vgg16), 'that is VGG16'),
      (_config(init_backbone=vgg19[1]['zip'], **{'model.width': 0.125}), r'conv1_1 .* \(3, 3, 3, 8\) in this network'),
      (_config(init_backbone=vgg19[1]['zip'], init_from=str(tmp_path)), 'init_backbone and config.init_from are both'),
  ]
  for config, match in cases:
    for workdir in (tmp_path / 'new', existing):
      with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(config, str(workdir))
      assert not (tmp_path / 'new').exists() and not os.listdir(existing)


def test_cli_refusal_is_one_error_line(tmp_path):
  vgg16 = _save(tmp_path, 'vgg16.pth', torchvision_layout(VGG16, random=False), legacy=True)
  workdir = tmp_path / 'w'
  config = os.path.join(REPO, 'configs', 'trousers.py')
  result = subprocess.run([sys.executable, '-m', 'kpjax.train', '--config', config, '--workdir', str(workdir),
                           f'--config.init_backbone={vgg16}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.startswith('error: config.init_backbone ') and 'that is VGG16' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not workdir.exists()


# ---- backbone_lr_multiplier ----------------------------------------------------------------------------

def _optimizer(config):
  return ts.make_optimizer(config, ts.make_schedule(config))


def _toy_params():
  """A tree with one pretrained layer and two others, at the paths the network uses."""
  return {'fcn': {'model1_0_0': {'conv1_1': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}},
                  'model1_1': {'conv6_1_CPM': {'kernel': jnp.ones((4,))}}},
          'hm_conv': {'kernel': jnp.ones((2,))}}


@pytest.mark.parametrize('optimizer,weight_decay', [('adam', 0.0), ('adam', 1e-4), ('rmsprop', 1e-4)])
def test_multiplier_one_is_the_optimizer_without_the_option(optimizer, weight_decay):
  """At 1: the chain kpjax built before the option existed (same state, same updates); other multipliers
  keep that state, so checkpoints restore whatever the multiplier (the training test resumes across one)."""
  config = fx.tiny_config(optimizer=optimizer, weight_decay=weight_decay)
  schedule = ts.make_schedule(config)
  if optimizer == 'adam':
    rule = [optax.adamw(schedule, weight_decay=weight_decay) if weight_decay else optax.adam(schedule)]
  else:
    rule = [optax.add_decayed_weights(weight_decay), optax.rmsprop(schedule, decay=0.9, eps=1e-8, eps_in_sqrt=False)]
  before = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), *rule)
  params = _toy_params()
  assert (jax.tree_util.tree_structure(_optimizer(config).init(params))
          == jax.tree_util.tree_structure(before.init(params)))
  grads = jax.tree_util.tree_map(lambda x: x * 0.3, params)
  opt = _optimizer(config)
  got, _ = opt.update(grads, opt.init(params), params)
  want, _ = before.update(grads, before.init(params), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  slower = _optimizer(fx.tiny_config(optimizer=optimizer, weight_decay=weight_decay, backbone_lr_multiplier=0.5))
  assert jax.tree_util.tree_structure(slower.init(params)) == jax.tree_util.tree_structure(before.init(params))


def test_multiplier_scales_the_pretrained_layers_after_global_clipping():
  """Adam's first step is -lr * g / (|g| + eps), times the multiplier for the pretrained layers: with
  gradients clipped near eps it shows the clipping scale, which must come from the global norm of all
  parameters (not of each group)."""
  lr, clip, multiplier = 1e-3, 1e-7, 0.1
  config = fx.tiny_config(learning_rate=lr, warmup_steps=0, schedule='constant', grad_clip_norm=clip,
                          backbone_lr_multiplier=multiplier)
  params = _toy_params()
  grads = jax.tree_util.tree_map(lambda x: x * 5.0, params)
  grads['hm_conv']['kernel'] = jnp.array([30.0, -40.0])
  optimizer = _optimizer(config)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads)))
  clipped = {key: g * clip / norm for key, g in _flat(grads).items()}
  for key, u in _flat(updates).items():
    scale = lr * (multiplier if key[:3] == ('fcn', 'model1_0_0', 'conv1_1') else 1.0)
    want = -scale * clipped[key] / (np.abs(clipped[key]) + 1e-8)
    np.testing.assert_allclose(u, want, rtol=1e-5, err_msg=str(key))
  with pytest.raises(ValueError, match='backbone_lr_multiplier = -1.0: expected a finite number >= 0'):
    config_check.check_config(fx.tiny_config(backbone_lr_multiplier=-1.0))

