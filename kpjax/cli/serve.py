"""`python -m kpjax.serve`: a web page and a JSON API over a kpjax model, with dynamic batching.

  python -m kpjax.serve --checkpoint workdir/demo [--host 127.0.0.1] [--port 8000]
      [--max-batch 16] [--max-delay-ms 5] [--max-upload-mb 20] [--max-pixels 100000000] [--step N]

Loads the model (a training workdir, one of its steps, or a converted/saved model directory) as
kpjax.predict does, compiles its forward pass for every batch shape, then listens and prints the URL.
Needs the serve extra (pip install 'kpjax[serve]'). A bad flag, a broken model directory or a port that
cannot be had is one `error:` line and exit status 2; Ctrl-C stops the server (status 0). The API and
the page: docs/serving.md and kpjax.serve.app.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Sequence

from kpjax.cli import common
from kpjax.errors import UserError


def parse_args(argv: Sequence[str] | None):
  parser = common.ArgumentParser(prog='python -m kpjax.serve', description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True,
                      help='a training workdir (its latest checkpoint), one of its steps, or a model directory')
  parser.add_argument('--step', type=int, help='the checkpoint step of a training workdir (default: latest)')
  parser.add_argument('--host', default='127.0.0.1',
                      help='the address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every network)')
  parser.add_argument('--port', type=int, default=8000, help='the TCP port (default 8000; 0: any free port)')
  parser.add_argument('--max-batch', type=int, default=16,
                      help='the most images in one forward pass (default 16); batch shapes 1, 2, 4... up to it are '
                           'compiled at start-up, rounded up to multiples of the device count')
  parser.add_argument('--max-delay-ms', type=float, default=5.0,
                      help='how long a request may wait for others to share its batch (default 5 ms)')
  parser.add_argument('--max-upload-mb', type=float, default=20.0,
                      help='the largest request body, in MiB (default 20); larger ones get status 413')
  parser.add_argument('--max-pixels', type=int, default=100_000_000,
                      help='the most pixels an image may have (default 100,000,000: any phone photo); '
                           'larger ones (decompression bombs) get status 413 before they are decoded')
  parser.add_argument('--max-pending', type=int, default=256,
                      help='predictions under way at once (default 256); more get status 503')
  parser.add_argument('--decode-threads', type=int, default=0,
                      help='threads decoding uploads (default 0: min(8, CPU cores))')
  parser.add_argument('--access-log', action='store_true', help="log every request (uvicorn's access log)")
  args = common.parse(parser, argv)
  for flag in ('max_batch', 'max_pixels', 'max_pending'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag.replace("_", "-")} must be at least 1')
  if args.max_delay_ms < 0 or args.decode_threads < 0:
    parser.error('--max-delay-ms and --decode-threads must be 0 or more')
  if not args.max_upload_mb > 0:
    parser.error('--max-upload-mb must be more than 0')
  if not 0 <= args.port <= 65535:
    parser.error(f'--port must be 0..65535; got {args.port}')
  return args


def _listen(host: str, port: int) -> socket.socket:
  """A bound socket (so a busy port is an error before the minutes of compilation, not after)."""
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise UserError(f'--host {host}: {e.strerror}') from None
  family, kind, proto, _, address = infos[0]
  sock = socket.socket(family, kind, proto)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError as e:
    sock.close()
    raise UserError(f'cannot listen on {host}:{port}: {e.strerror or e}') from None
  return sock


def _url(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f'http://{f"[{host}]" if ":" in host else host}:{port}/'


async def _serve(server, sock: socket.socket, url: str) -> None:
  task = asyncio.ensure_future(server.serve(sockets=[sock]))
  while not server.started and not task.done():
    await asyncio.sleep(0.02)
  if server.started:
    print(f'kpjax.serve: listening on {url} (the page; API: POST {url}v1/predict, GET {url}v1/model, '
          f'{url}healthz, {url}metrics)', flush=True)
  await task


def run(args) -> int:
  try:
    import uvicorn  # pylint: disable=g-import-not-at-top
    from kpjax.serve import app as app_lib  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"kpjax.serve needs the serve extra: pip install 'kpjax[serve]' ({e})") from None
  from kpjax.serve import runner as runner_lib  # pylint: disable=g-import-not-at-top

  runner = runner_lib.ModelRunner(args.checkpoint, step=args.step, max_batch=args.max_batch)
  sock = _listen(args.host, args.port)
  spec = runner.spec
  print(f'kpjax.serve: model {runner.name} ({runner.category}, {spec.n_locations} keypoints, '
        f'{spec.input_size}x{spec.input_size} input, {spec.convention.name} preprocessing) on '
        f'{len(runner.mesh.devices.flat)} {runner.mesh.devices.flat[0].platform} device(s); compiling batch sizes '
        f'{",".join(map(str, runner.batch_sizes))} with and without flip...', flush=True)
  seconds = runner.compile()
  print(f'kpjax.serve: compiled in {seconds:.1f} s', flush=True)
  app = app_lib.create_app(runner, max_delay_ms=args.max_delay_ms, max_upload_bytes=int(args.max_upload_mb * 2 ** 20),
                           max_pixels=args.max_pixels, decode_threads=args.decode_threads,
                           max_pending=args.max_pending)
  config = uvicorn.Config(app, log_level='info' if args.access_log else 'warning', access_log=args.access_log,
                          timeout_graceful_shutdown=5)
  try:
    asyncio.run(_serve(uvicorn.Server(config), sock, _url(sock)))
  except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it: the normal way to stop
    pass
  print('kpjax.serve: stopped', flush=True)
  return common.OK


def main(argv: Sequence[str] | None = None) -> int:
  return common.run(run, parse_args(argv))

