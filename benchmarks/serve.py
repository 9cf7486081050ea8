"""Serving benchmark: requests/s and p50/p99 latency of `python -m kpjax.serve` at 1, 4 and 16 concurrent
clients, against the same model's bare batched forward pass on the same machine.

  python benchmarks/serve.py                                            # demo-sized: 32x32, width 3/32, 2 stages
  python benchmarks/serve.py --size 128 --width 0.125 --num-stages 2    # a model whose forward pass dominates
  python benchmarks/serve.py --checkpoint workdir/demo --json serve.json
  python benchmarks/serve.py --tiny                                     # seconds: the tests' smoke run

The server is a subprocess started as a user starts it (`python -m kpjax.serve --checkpoint M --host
127.0.0.1 --port 0 --max-batch B`), over --checkpoint or a randomly initialised model of the given size
(weights do not change the time), saved to a temporary directory. The clients are threads of this
process, each with one keep-alive HTTP connection (http.client), POSTing the same garment JPEG (a
synthetic garment of --image-size px, FashionAI's 512 by default) as the raw body; each client count
gets --warmup requests per client, then --requests timed, in each of --rounds rounds over the client
counts; each figure is the median over the rounds. The bare forward is the model's jitted forward pass
(kpjax.inference.predictor.make_predict_fn with confidence, on the same device mesh as the server),
compiled ahead of time and timed here on a batch of B already on the device, just before and just after
each client count's requests (the server idle): a machine whose load drifts moves both alike.

Columns: requests/s; ms/image = the requests' wall time / their number; p50, p99 = latency percentiles;
mean batch = images per forward pass the server ran (its /metrics); server forward = the server's own
time in its forward passes per image (pad, device transfer, forward, back to pixels); bare = the bare
forward's per image; server adds = ms/image / bare - 1 (the issue's goal: under 10% at 16 clients);
client CPU = the CPU the clients themselves used, as a share of one core (they share the machine with
the server).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = re.compile(r'listening on (http://\S+/)')
JSON_KEYS = ('cpu', 'date', 'model', 'image_size', 'max_batch', 'max_delay_ms', 'bare_forward_ms_per_image',
             'rows', 'rounds', 'goal')


# ---- A server process and its clients (also used by tests/test_serve_process.py) -------------------


class ServerProcess:
  """`python -m kpjax.serve --checkpoint CKPT --host 127.0.0.1 --port PORT ARGS...` in a subprocess.

  `start()` waits (up to `timeout_s`) for its `listening on URL` line and sets `url`; `stop()` sends
  SIGINT as Ctrl-C would and returns the exit status. Its stdout and stderr are kept (`output()`).
  """

  def __init__(self, checkpoint: str, *args: str, port: int = 0, timeout_s: float = 300.0, env=None):
    self.argv = [sys.executable, '-m', 'kpjax.serve', '--checkpoint', checkpoint, '--host', '127.0.0.1',
                 '--port', str(port), *args]
    self.timeout_s = timeout_s
    self.env = env
    self.url: str | None = None
    self.process: subprocess.Popen | None = None
    self._lines: list[str] = []

  def start(self) -> ServerProcess:
    self.process = subprocess.Popen(self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=self.env)
    found: queue.Queue = queue.Queue()

    def read():
      for line in self.process.stdout:
        self._lines.append(line)
        match = LISTENING.search(line)
        if match:
          found.put(match.group(1))
      found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
      self.url = found.get(timeout=self.timeout_s)
    except queue.Empty:
      self.url = None
    if self.url is None:
      status = self.stop()
      raise RuntimeError(f'the server did not start (exit status {status}):\n{self.output()[-3000:]}')
    return self

  def output(self) -> str:
    return ''.join(self._lines)

  def stop(self, timeout_s: float = 30.0) -> int:
    if self.process is None:
      return 0
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGINT)
      try:
        self.process.wait(timeout_s)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    return self.process.returncode

  def __enter__(self) -> ServerProcess:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


@dataclasses.dataclass(frozen=True)
class Request:
  """One POST /v1/predict: the image's bytes and the query string ('' or 'category=dress&flip=true')."""
  body: bytes
  query: str = ''


@dataclasses.dataclass
class Answer:
  """What came back for request `index`: HTTP status (0: no answer, `error` says why), body, latency."""
  index: int
  status: int
  body: bytes
  seconds: float
  error: str = ''


def run_load(url: str, requests: Sequence[Request], clients: int, timeout_s: float = 300.0) -> list[Answer]:
  """Sends every request once, `clients` at a time: each client a thread with one keep-alive connection,
  taking the next request as soon as its answer is in. Returns the answers in request order; raises
  TimeoutError if they are not all in after `timeout_s` (every socket also times out after it)."""
  target = urllib.parse.urlsplit(url)
  path = target.path.rstrip('/') + '/v1/predict'
  deadline = time.monotonic() + timeout_s
  todo: queue.SimpleQueue = queue.SimpleQueue()
  for i in range(len(requests)):
    todo.put(i)
  answers: list[Answer | None] = [None] * len(requests)

  def client():
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout_s)
    try:
      while time.monotonic() < deadline:
        try:
          i = todo.get_nowait()
        except queue.Empty:
          return
        r = requests[i]
        start = time.perf_counter()
        try:
          conn.request('POST', path + (f'?{r.query}' if r.query else ''), body=r.body,
                       headers={'Content-Type': 'application/octet-stream'})
          response = conn.getresponse()
          answers[i] = Answer(i, response.status, response.read(), time.perf_counter() - start)
        except (OSError, http.client.HTTPException) as e:
          answers[i] = Answer(i, 0, b'', time.perf_counter() - start, f'{type(e).__name__}: {e}')
          conn.close()
          conn = http.client.HTTPConnection(target.hostname, target.port, timeout=timeout_s)
    finally:
      conn.close()

  threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(max(0.0, deadline - time.monotonic()))
  missing = [i for i, a in enumerate(answers) if a is None]
  if missing:
    raise TimeoutError(f'{len(missing)} of {len(requests)} requests unanswered after {timeout_s:.0f} s')
  return answers


def read_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
  """The server's /metrics as {(sample name, sorted labels): value} (prometheus_client's parser)."""
  from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=g-import-not-at-top
  target = urllib.parse.urlsplit(url)
  conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
  try:
    conn.request('GET', target.path.rstrip('/') + '/metrics')
    text = conn.getresponse().read().decode()
  finally:
    conn.close()
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for family in text_string_to_metric_families(text) for s in family.samples}


def batch_counts(metrics) -> tuple[float, float, float]:
  """(forward passes, images in them, images in passes of one image alone) so far."""
  passes = metrics[('kpjax_batch_size_count', ())]
  images = metrics[('kpjax_batch_size_sum', ())]
  alone = metrics[('kpjax_batch_size_bucket', (('le', '1.0'),))]
  return passes, images, alone


# ---- The model, the image, the bare forward ---------------------------------------------------------


def random_model(directory: str, category: str, size: int, width: float, num_stages: int, seed: int = 0) -> str:
  """A model directory of the given size with LeCun-normal random weights (drawn with numpy: flax's own
  initialisation takes longer to compile than the benchmark to run)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kpjax.data import conventions  # pylint: disable=g-import-not-at-top
  from kpjax.data.spec import ModelSpec  # pylint: disable=g-import-not-at-top
  from kpjax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  from kpjax.model import network  # pylint: disable=g-import-not-at-top
  spec = ModelSpec(category, width, num_stages, size, conventions.get('kpjax'))
  net = spec.build()
  shapes = jax.eval_shape(lambda: network.init_variables(net, jax.random.key(0), size))
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map(
      lambda s: (rng.normal(0, 1, s.shape) / math.sqrt(max(1, math.prod(s.shape[:-1])))).astype(np.float32), shapes)
  return checkpoints.save_model(directory, variables, spec.metadata(source='benchmarks/serve.py: random weights'))


def garment_jpeg(side: int, seed: int = 0) -> bytes:
  """A synthetic dress (kpjax.data.synthetic) as a side x side JPEG, as FashionAI's photos are."""
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from kpjax.data.synthetic import garments  # pylint: disable=g-import-not-at-top
  example = garments.render('dress', np.random.default_rng(seed), width=side, height=side)
  buf = io.BytesIO()
  Image.fromarray(example.image).save(buf, format='JPEG', quality=90)
  return buf.getvalue()


class BareForward:
  """The model's forward pass on a device-resident batch of `batch`, compiled ahead of time as kpjax.serve
  compiles it (make_predict_fn with confidence, no flip, the same device mesh)."""

  def __init__(self, checkpoint: str, batch: int):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from kpjax.inference import devices  # pylint: disable=g-import-not-at-top
    from kpjax.inference import predictor  # pylint: disable=g-import-not-at-top
    model, variables, spec, _ = predictor.load_predictor(checkpoint)
    mesh = devices.make_mesh()
    self.variables = devices.replicate(variables, mesh)
    fn = predictor.make_predict_fn(model, category=spec.category, mesh=mesh, confidence=True)
    self.batch = devices.local_batch_size(batch, mesh)
    shape = (self.batch, spec.input_size, spec.input_size, 3)
    self.images = devices.shard_batch({'x': np.zeros(shape, np.float32)}, mesh)['x']
    self.compiled, _ = common.compile_timed(fn, self.variables, self.images)

  def ms_per_image(self, min_s: float = 0.3) -> float:
    """The median time of one call over at least `min_s` of calls (after one untimed), per image."""
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(self.compiled(self.variables, self.images))
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < min_s or len(samples) < 3:
      t0 = time.perf_counter()
      jax.block_until_ready(self.compiled(self.variables, self.images))
      samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples) / self.batch


# ---- The benchmark ------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = common.ArgumentParser(__doc__)
  p.add_argument('--checkpoint', help='a model to serve (default: random weights of --size/--width/--num-stages)')
  p.add_argument('--size', type=common.input_size, default=32, help='input side of the random model (default 32)')
  p.add_argument('--width', type=common.positive_float, default=0.09375, help='its width (default 3/32)')
  p.add_argument('--num-stages', type=common.num_stages, default=2, help='its CPM stages (default 2)')
  p.add_argument('--category', default='all', choices=common.categories(), help='its category (default all)')
  p.add_argument('--clients', default='1,4,16', help='concurrent clients to try, comma-separated (default 1,4,16)')
  p.add_argument('--requests', type=common.positive_int, default=200,
                 help='requests timed per client count and round (default 200)')
  p.add_argument('--warmup', type=common.non_negative_int, default=3, help='untimed requests per client first')
  p.add_argument('--max-batch', type=common.positive_int, default=16, help="the server's --max-batch (16)")
  p.add_argument('--max-delay-ms', type=common.non_negative_float, default=5.0, help="the server's --max-delay-ms")
  p.add_argument('--image-size', type=common.positive_int, default=512, help='side of the JPEG sent (default 512)')
  p.add_argument('--rounds', type=common.positive_int, default=3,
                 help='rounds over the client counts (default 3); each client count reports its median round')
  p.add_argument('--timeout-s', type=common.positive_float, default=600.0, help='for each client count (600)')
  p.add_argument('--json', metavar='OUT', help='also write the figures as JSON')
  p.add_argument('--tiny', action='store_true',
                 help='a 16x16, width 1/16, 1-stage model, 64 px images, --max-batch 2, 24 requests: seconds '
                      '(the tests)')
  args = p.parse_args(argv)
  try:
    args.clients = [int(c) for c in args.clients.split(',')]
  except ValueError:
    p.error(f'--clients must be comma-separated integers; got {args.clients!r}')
  if not args.clients or min(args.clients) < 1:
    p.error('--clients must be positive integers')
  if args.tiny:
    args.size, args.width, args.num_stages, args.image_size = 16, 0.0625, 1, 64
    args.requests, args.warmup, args.rounds, args.max_batch = 24, 1, 1, 2
  return args


def percentile(values: Sequence[float], q: float) -> float:
  """The q-th percentile (0..100) by linear interpolation between order statistics (numpy's default)."""
  ordered = sorted(values)
  k = (len(ordered) - 1) * q / 100
  lo, hi = math.floor(k), math.ceil(k)
  return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(url: str, request: Request, clients: int, requests: int, warmup: int, timeout_s: float) -> dict:
  """One client count: warm-up, then `requests` timed; the row's figures."""
  if warmup:
    run_load(url, [request] * (warmup * clients), clients, timeout_s)
  metrics0 = read_metrics(url)
  cpu0, start = time.process_time(), time.perf_counter()
  answers = run_load(url, [request] * requests, clients, timeout_s)
  wall, client_cpu = time.perf_counter() - start, time.process_time() - cpu0
  metrics1 = read_metrics(url)
  before, after = batch_counts(metrics0), batch_counts(metrics1)
  forward_s = metrics1[('kpjax_forward_seconds_sum', ())] - metrics0[('kpjax_forward_seconds_sum', ())]
  failed = [a for a in answers if a.status != 200]
  if failed:
    raise RuntimeError(f'{len(failed)} of {requests} requests failed; the first: {failed[0].status} '
                       f'{failed[0].error or failed[0].body[:300]!r}')
  latencies = [a.seconds * 1e3 for a in answers]
  passes, images = after[0] - before[0], after[1] - before[1]
  return {'clients': clients, 'requests': requests, 'seconds': wall, 'requests_per_s': requests / wall,
          'ms_per_image': 1e3 * wall / requests, 'p50_ms': percentile(latencies, 50),
          'p99_ms': percentile(latencies, 99), 'mean_ms': statistics.fmean(latencies),
          'mean_batch': images / passes if passes else 0.0, 'client_cpu_share': client_cpu / wall,
          'server_forward_ms_per_image': 1e3 * forward_s / images if images else 0.0}


ROW_FIGURES = ('requests_per_s', 'ms_per_image', 'p50_ms', 'p99_ms', 'mean_batch', 'client_cpu_share',
               'server_forward_ms_per_image', 'bare_ms_per_image', 'vs_bare')


def main(argv=None) -> dict:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory(prefix='kpjax-serve-bench-') as tmp:
    if args.checkpoint:
      checkpoint, described = args.checkpoint, args.checkpoint
    else:
      checkpoint = random_model(os.path.join(tmp, 'model'), args.category, args.size, args.width, args.num_stages)
      described = (f'random {args.category} model, {args.size}x{args.size} input, width {args.width:g}, '
                   f'{args.num_stages} stages')
    from kpjax.inference import checkpoints  # pylint: disable=g-import-not-at-top
    category = checkpoints.read_metadata(checkpoint)['category']
    request = Request(garment_jpeg(args.image_size), 'category=dress' if category == 'all' else '')
    bare_one = BareForward(checkpoint, 1).ms_per_image()
    bare = BareForward(checkpoint, args.max_batch)
    rounds = []
    with ServerProcess(checkpoint, '--max-batch', str(args.max_batch), '--max-delay-ms', str(args.max_delay_ms),
                       timeout_s=args.timeout_s) as server:
      for _ in range(args.rounds):
        for clients in args.clients:
          # The bare forward just before and after each client count's requests: a machine whose load
          # drifts (other jobs) moves both alike.
          before = bare.ms_per_image()
          row = measure(server.url, request, clients, args.requests, args.warmup, args.timeout_s)
          row['bare_ms_per_image'] = 0.5 * (before + bare.ms_per_image())
          row['vs_bare'] = row['ms_per_image'] / row['bare_ms_per_image'] - 1
          rounds.append(row)
  rows = []
  for clients in args.clients:
    mine = [r for r in rounds if r['clients'] == clients]
    rows.append({'clients': clients, 'requests': sum(r['requests'] for r in mine), 'rounds': len(mine),
                 **{k: statistics.median(r[k] for r in mine) for k in ROW_FIGURES}})
  report = {
      'cpu': common.cpu_model(), 'date': time.strftime('%Y-%m-%d'), 'model': described,
      'image_size': args.image_size, 'max_batch': args.max_batch, 'max_delay_ms': args.max_delay_ms,
      'bare_forward_ms_per_image': {'1': bare_one, str(bare.batch): statistics.median(r['bare_ms_per_image']
                                                                                    for r in rounds)},
      'rows': rows, 'rounds': rounds, 'goal': None,
  }
  big = [r for r in rows if r['clients'] == 16]
  if big:
    report['goal'] = {'clients': 16, 'server_adds': big[0]['vs_bare'], 'met': big[0]['vs_bare'] < 0.10}
  print(f'# kpjax.serve on {common.machine_description()}, {report["date"]}: {described}; {args.image_size}x'
        f'{args.image_size} JPEG uploads; --max-batch {args.max_batch} --max-delay-ms {args.max_delay_ms:g}; '
        f'medians of {args.rounds} rounds of {args.requests} requests')
  print(f'# bare forward (jit, device-resident batch): {bare_one:.2f} ms/image at batch 1, '
        f'{report["bare_forward_ms_per_image"][str(bare.batch)]:.2f} ms/image at batch {bare.batch}')
  print()
  print(common.format_table(
      ['clients', 'requests/s', 'ms/image', 'p50 ms', 'p99 ms', 'mean batch', 'server forward ms/image',
       f'bare ms/image (batch {bare.batch})', 'server adds', 'client CPU'],
      [[r['clients'], f'{r["requests_per_s"]:.1f}', f'{r["ms_per_image"]:.2f}', f'{r["p50_ms"]:.1f}',
        f'{r["p99_ms"]:.1f}', f'{r["mean_batch"]:.1f}', f'{r["server_forward_ms_per_image"]:.2f}',
        f'{r["bare_ms_per_image"]:.2f}', f'{100 * r["vs_bare"]:+.0f}%', f'{100 * r["client_cpu_share"]:.0f}%']
       for r in rows]))
  if report['goal']:
    g = report['goal']
    print(f'\nAt 16 clients the server adds {100 * g["server_adds"]:.0f}% to the bare forward\'s time per image '
          f'(goal: under 10%: {"met" if g["met"] else "not met"}).')
  if args.json:
    from kpjax.io import atomic  # pylint: disable=g-import-not-at-top
    atomic.write_text(args.json, json.dumps(report, indent=1) + '\n')
  return report


if __name__ == '__main__':
  main()
