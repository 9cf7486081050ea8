"""A tiny in-memory FashionAI-like dataset and a slim config, for training tests (also run as a script
in subprocesses: `python tests/train_fixture.py WORKDIR JSON_OVERRIDES`)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kpjax.data import keypoints as kp
from kpjax.configs import base
from kpjax.data import pipeline
from kpjax.data.spec import ModelSpec
from kpjax.data import sources


def make_records(n: int, seed: int, category: str = 'trousers') -> list[dict]:
  """n JPEG records of `category` with coloured squares at random keypoints (learnable, seeded)."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    h, w = 64, 48
    image = np.full((h, w, 3), 200, np.uint8)
    xy = np.full((kp.NUM_KEYPOINTS, 2), -1, np.float32)
    vis = np.full((kp.NUM_KEYPOINTS,), -1, np.int32)
    for j in kp.keypoint_indices(category):
      x, y = int(rng.integers(4, w - 4)), int(rng.integers(4, h - 4))
      xy[j], vis[j] = (x, y), 1
      image[y - 2:y + 3, x - 2:x + 3] = (10 * j, 255 - 10 * j, 0)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format='JPEG', quality=95)
    records.append(dict(image=buf.getvalue(), image_id=f'Images/{category}/{seed}_{i}.jpg',
                        category=kp.category_index(category), keypoints=xy, visibility=vis, height=h, width=w))
  return records


RECORDS = {'train': make_records(16, 0), 'validation': make_records(9, 1)}  # 9: an odd number to share out


def _get_source(data, split, workdir=None):
  del data, workdir
  return sources.RecordSource(RECORDS[split], split)


def install_source(monkeypatch=None) -> None:
  """Makes sources.get_source serve RECORDS instead of a TFDS dataset (undone after the test when
  given pytest's monkeypatch; for good in the subprocess script)."""
  if monkeypatch is None:
    sources.get_source = _get_source
  else:
    monkeypatch.setattr(sources, 'get_source', _get_source)


def tiny_config(**overrides):
  config = base.get_config()
  config.category = 'trousers'
  config.input_size = 32
  config.model.width = 0.125
  config.model.num_stages = 1
  config.batch_size = 4
  config.eval_batch_size = 8
  config.total_steps = 8
  config.warmup_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 4
  config.num_vis_images = 2
  return with_overrides(config, overrides)


def with_overrides(config, overrides: dict):
  """`config` with {'model.width': 0.5, ...} set by dotted name, as --config.model.width=0.5 would."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return config


def train_batches(config, source, seed: int = 0, process_index: int = 0, process_count: int = 1):
  """The training batches of a config (with `seed`), as kpjax.train makes them."""
  from kpjax.train import loop as train
  config = config.copy_and_resolve_references()
  config.seed = seed
  return train.make_train_iterator(config, source, process_index, process_count)


def eval_batches(config, source, **kwargs):
  """pipeline.eval_batches for a config's model."""
  return pipeline.eval_batches(source, ModelSpec.from_config(config), config.data, **kwargs)


def step_and_state(config, mesh=None, seed: int = 0):
  """(jitted train step, fresh TrainState) for a config, as kpjax.train builds them."""
  from kpjax.train import step as ts
  model, optimizer, step = ts.make_training(config, mesh)
  return step, ts.create_train_state(model, optimizer, jax.random.key(seed), config.input_size)


def free_port() -> int:
  """A TCP port nobody listens on right now (for a jax.distributed coordinator on localhost)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def train_losses(workdir: str) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]


if __name__ == '__main__':
  # python tests/train_fixture.py WORKDIR JSON: trains tiny_config(**JSON) in WORKDIR on RECORDS and prints the
  # summary as JSON. JSON may hold '_distributed': {coordinator, num_processes, process_id} (a process of a
  # multi-process run; without it, what the environment says: kpjax.distributed.initialize_distributed), and
  # '_evaluate': true (then also print kpjax.evaluate's scores of the workdir's latest checkpoint).
  from kpjax.inference import evaluation as evaluate
  from kpjax.inference import devices
  from kpjax.train import distributed
  from kpjax.train import loop as train
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  dist = overrides.pop('_distributed', None) or {}
  then_evaluate = overrides.pop('_evaluate', False)
  distributed.initialize_distributed(dist.get('coordinator'), dist.get('num_processes'), dist.get('process_id'))
  install_source()
  config = tiny_config(**overrides)
  print(json.dumps(train.train_and_evaluate(config, workdir)))
  if then_evaluate:
    scores, _ = evaluate.evaluate_model(config, workdir)
    print(json.dumps({'evaluate/ne': scores['ne'], 'evaluate/images': scores['images']}))
