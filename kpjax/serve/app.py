"""The ASGI app of `python -m kpjax.serve` (Starlette): the page, the JSON API, health and metrics.

  GET  /             the page (kpjax/serve/static/: choose or drop a photo, see its keypoints)
  POST /v1/predict   an image as the raw body, or as the multipart field `image`; options `category` and
                     `flip` as query or form fields ->
                     {"model", "category", "image": {"width", "height"},
                      "keypoints": [{"name", "x", "y", "confidence"}], "flip", "batch_size", "timing_ms"}
                     in the pixels of the upright image a viewer shows (kpjax.inference.prediction.image_result)
  GET  /v1/model     what the model is and answers: categories, keypoint names, skeletons, metadata, limits
  GET  /healthz      {"status": "ok"} once the model is compiled
  GET  /metrics      Prometheus text (kpjax.serve.metrics)

Every error is a JSON `{"error": "..."}` with a 4xx status (400 a bad option, body or image; 404, 405;
413 a body over `max_upload_bytes` or an image over `max_pixels`; 503 when `max_pending` predictions are
already under way) or, for a bug, 500; no request can stop the server. Uploads are decoded in a pool of
threads, never on the event loop; their forward passes go through the dynamic batcher
(kpjax.serve.batcher) in the model runner's compiled batch shapes (kpjax.serve.runner).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sys
import time
import traceback

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from kpjax.data import images
from kpjax.data import keypoint_sets
from kpjax.errors import ImageError, ImageTooLarge
from kpjax.inference import drawing
from kpjax.inference.prediction import image_result
from kpjax.serve.batcher import DynamicBatcher
from kpjax.serve.metrics import MetricsMiddleware, ServeMetrics

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
ENDPOINTS = ('/', '/v1/predict', '/v1/model', '/healthz', '/metrics')
OPTIONS = ('category', 'flip')
_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off', '')


def error_response(status: int, message: str, headers=None) -> JSONResponse:
  return JSONResponse({'error': message}, status_code=status, headers=headers)


class BadRequest(HTTPException):
  """A client's mistake: status 400 (or the one given) and a message saying what was expected."""

  def __init__(self, detail: str, status_code: int = 400):
    super().__init__(status_code=status_code, detail=detail)


def parse_flip(value: str | None) -> bool:
  text = (value or '').strip().lower()
  if text in _TRUE:
    return True
  if text in _FALSE:
    return False
  raise BadRequest(f'flip must be true or false (1/0, yes/no, on/off); got {value!r}')


def resolve_category(value: str | None, model_category: str, categories: tuple[str, ...],
                     keypoint_set: keypoint_sets.KeypointSet) -> str:
  """The category whose keypoints to answer with: the request's, or a per-category model's own."""
  if not value:
    if model_category == keypoint_sets.ALL:
      raise BadRequest(f'this model predicts all {keypoint_set.num_keypoints} keypoints of {keypoint_set.name}: say '
                       f'the {keypoint_set.noun} with category=one of {", ".join(categories)}')
    return model_category
  if value not in categories:
    raise BadRequest(f'unknown category {value!r}; this {model_category} model answers category='
                     f'{" or ".join(categories)}')
  return value


class BodyLimit:
  """ASGI middleware: a request body over `max_bytes` gets a JSON 413. A Content-Length over it is answered
  at once, before the body is read; a body without one (chunked) is counted as the app reads it, and the
  read that passes the limit raises a 413 the app answers like any other error."""

  def __init__(self, app, max_bytes: int):
    self.app = app
    self.max_bytes = max_bytes

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      await self.app(scope, receive, send)
      return
    length = dict(scope['headers']).get(b'content-length', b'')
    if length.isdigit() and int(length) > self.max_bytes:
      await error_response(413, too_large_message(int(length), self.max_bytes))(scope, receive, send)
      return
    received = 0

    async def counted():
      nonlocal received
      message = await receive()
      if message['type'] == 'http.request':
        received += len(message.get('body', b''))
        if received > self.max_bytes:
          raise BadRequest(too_large_message(None, self.max_bytes), status_code=413)
      return message

    await self.app(scope, counted, send)


def too_large_message(size: int | None, limit: int) -> str:
  got = f'{size:,} bytes' if size is not None else f'over {limit:,} bytes'
  return f'the body is {got}; the server takes at most {limit:,} bytes ({limit / 2 ** 20:g} MiB, --max-upload-mb)'


class Service:
  """The state behind the routes: the model runner, the batcher, the decode threads, the limits."""

  def __init__(self, runner, *, max_delay_ms: float = 5.0, max_upload_bytes: int = 20 * 2 ** 20,
               max_pixels: int | None = images.DEFAULT_MAX_PIXELS, decode_threads: int = 0, max_pending: int = 256):
    self.runner = runner
    self.max_delay_ms = float(max_delay_ms)
    self.max_upload_bytes = int(max_upload_bytes)
    self.max_pixels = max_pixels
    self.decode_threads = decode_threads or min(8, os.cpu_count() or 1)
    self.max_pending = int(max_pending)
    self.metrics = ServeMetrics(ENDPOINTS, runner.batch_sizes[-1])
    self.batcher = DynamicBatcher(self._run_batch, max_batch=runner.batch_sizes[-1], max_delay_s=max_delay_ms / 1e3)
    self.pending = 0
    self._decode_pool: concurrent.futures.ThreadPoolExecutor | None = None

  @contextlib.asynccontextmanager
  async def lifespan(self, app):
    del app
    self._decode_pool = concurrent.futures.ThreadPoolExecutor(self.decode_threads, thread_name_prefix='kpjax-decode')
    await self.batcher.start()
    try:
      yield
    finally:
      await self.batcher.close()
      self._decode_pool.shutdown(wait=True)

  def _run_batch(self, flip: bool, batch):
    """The batcher's function (its own thread): one forward pass, with its timing for every request."""
    start = time.perf_counter()
    outputs = self.runner.run(flip, batch)
    seconds = time.perf_counter() - start
    self.metrics.observe_batch(len(batch), self.runner.padded_size(len(batch)), seconds)
    return [(out, start, seconds, len(batch)) for out in outputs]

  # ---- Routes --------------------------------------------------------------------------------

  async def page(self, request: Request) -> Response:
    del request
    return FileResponse(os.path.join(STATIC_DIR, 'index.html'), media_type='text/html')

  async def healthz(self, request: Request) -> Response:
    del request
    return JSONResponse({'status': 'ok', 'model': self.runner.name})

  async def metrics_text(self, request: Request) -> Response:
    del request
    body, content_type = self.metrics.exposition()
    return Response(body, media_type=content_type)

  async def model(self, request: Request) -> Response:
    del request
    r = self.runner
    spec = r.spec
    return JSONResponse({
        'name': r.name, 'checkpoint': r.checkpoint, 'category': r.category, 'categories': list(r.categories),
        'keypoints': {c: list(spec.keypoint_set.keypoint_names(c)) for c in r.categories},
        'skeleton': {c: [list(edge) for edge in spec.keypoint_set.skeleton(c)] for c in r.categories},
        'colors': {n: '#{:02x}{:02x}{:02x}'.format(*drawing.side_color(n)) for n in spec.keypoint_set.keypoints},
        'keypoint_set': spec.keypoint_set.to_json(),
        'input_size': spec.input_size, 'preprocessing': spec.convention.name, 'width': spec.width,
        'num_stages': spec.num_stages, 'metadata': r.metadata, 'batch_sizes': list(r.batch_sizes),
        'max_delay_ms': self.max_delay_ms, 'devices': [str(d) for d in r.mesh.devices.flat],
        'formats': list(images.formats()),
        'limits': {'max_upload_bytes': self.max_upload_bytes, 'max_pixels': self.max_pixels,
                   'max_pending': self.max_pending},
    })

  async def predict(self, request: Request) -> Response:
    start = time.perf_counter()
    if self.pending >= self.max_pending:
      return error_response(503, f'busy: {self.pending} predictions under way (--max-pending {self.max_pending}); '
                                 'retry shortly', headers={'Retry-After': '1'})
    self.pending += 1
    self.metrics.in_flight.inc()
    try:
      return await self._predict(request, start)
    except HTTPException:
      raise
    except Exception as e:  # pylint: disable=broad-except  (a bug: answered and logged, the server carries on)
      traceback.print_exc(file=sys.stderr)
      return error_response(500, f'internal error: {type(e).__name__}: {e}')
    finally:
      self.pending -= 1
      self.metrics.in_flight.dec()

  async def _predict(self, request: Request, start: float) -> Response:
    options = dict(request.query_params)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
      raise BadRequest(f'unknown query parameter {unknown[0]!r}; expected {" and ".join(OPTIONS)}')
    if request.headers.get('content-type', '').lower().startswith('multipart/form-data'):
      data = await self._multipart_image(request, options)
    else:
      data = await request.body()
    if not data:
      raise BadRequest('empty body: send the image file as the body (curl --data-binary @photo.jpg) or as the '
                       'multipart field image (curl -F image=@photo.jpg)')
    category = resolve_category(options.get('category'), self.runner.category, self.runner.categories,
                                self.runner.spec.keypoint_set)
    flip = parse_flip(options.get('flip'))
    loop = asyncio.get_running_loop()
    decode_start = time.perf_counter()
    try:
      prepared = await loop.run_in_executor(self._decode_pool, self.runner.prepare, data, self.max_pixels)
    except ImageTooLarge as e:
      raise BadRequest(f'{e} (--max-pixels)', status_code=413) from None
    except ImageError as e:
      raise BadRequest(str(e)) from None
    decoded = time.perf_counter()
    self.metrics.decode.observe(decoded - decode_start)
    output, batch_start, batch_seconds, batch_size = await self.batcher.submit(flip, prepared)
    self.metrics.queue.observe(max(0.0, batch_start - decoded))
    result = image_result(output.coords, output.confidence, category, self.runner.category, prepared.height,
                          prepared.width, self.runner.spec.keypoint_set)
    total = time.perf_counter() - start
    return JSONResponse({
        'model': self.runner.name, **result, 'flip': flip, 'batch_size': batch_size,
        'timing_ms': {'decode': 1e3 * (decoded - decode_start), 'queue': 1e3 * max(0.0, batch_start - decoded),
                      'model': 1e3 * batch_seconds, 'total': 1e3 * total},
    })

  async def _multipart_image(self, request: Request, options: dict[str, str]) -> bytes:
    """The bytes of the multipart field `image`; its other fields join `options` (each given once)."""
    async with request.form(max_files=1, max_fields=len(OPTIONS)) as form:
      data = None
      for name, value in form.multi_items():
        if name == 'image':
          if not isinstance(value, UploadFile):
            raise BadRequest('the multipart field image must be a file (curl -F image=@photo.jpg)')
          data = await value.read()
        elif name in OPTIONS:
          if name in options:
            raise BadRequest(f'{name} is given twice (query and form); give it once')
          options[name] = str(value)
        else:
          raise BadRequest(f'unknown form field {name!r}; expected image, {" and ".join(OPTIONS)}')
      if data is None:
        raise BadRequest('the multipart body has no field image (curl -F image=@photo.jpg)')
      return data


async def _http_error(request: Request, exc: HTTPException) -> Response:
  """Every HTTPException (ours, 404, 405, Starlette's own 400s) as JSON."""
  status, message = exc.status_code, exc.detail
  if status == 404:
    message = (f'no such page: {request.method} {request.url.path}; the server answers GET /, POST /v1/predict, '
               'GET /v1/model, GET /healthz and GET /metrics')
  elif status == 405:
    message = f'{request.method} is not allowed on {request.url.path}; use {(exc.headers or {}).get("Allow", "GET")}'
  return error_response(status, message, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
  del request
  return error_response(500, f'internal error: {type(exc).__name__}: {exc}')


def create_app(runner, **options) -> Starlette:
  """The app over a compiled kpjax.serve.runner.ModelRunner; options: Service's limits and batching."""
  service = Service(runner, **options)
  routes = [
      Route('/', service.page, methods=['GET']),
      Route('/v1/predict', service.predict, methods=['POST']),
      Route('/v1/model', service.model, methods=['GET']),
      Route('/healthz', service.healthz, methods=['GET']),
      Route('/metrics', service.metrics_text, methods=['GET']),
      Mount('/static', app=StaticFiles(directory=STATIC_DIR), name='static'),
  ]
  app = Starlette(routes=routes, lifespan=service.lifespan,
                  middleware=[Middleware(MetricsMiddleware, metrics=service.metrics),
                              Middleware(BodyLimit, max_bytes=service.max_upload_bytes)],
                  exception_handlers={HTTPException: _http_error, Exception: _server_error})
  app.state.service = service
  return app
