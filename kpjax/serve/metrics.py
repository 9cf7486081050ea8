"""What `GET /metrics` reports, in Prometheus' text format (prometheus_client, one registry per app):

  kpjax_requests_total{endpoint, status}         requests answered (every status; errors too)
  kpjax_request_errors_total{endpoint, status}   of them, the 4xx and 5xx answers
  kpjax_request_seconds{endpoint}                latency, request received -> answer sent (histogram)
  kpjax_batch_size                               images per forward pass (histogram; buckets 1, 2, 3, 4...)
  kpjax_batch_padded_size                        the compiled batch shape each pass ran in (histogram)
  kpjax_forward_seconds                          one batch: pad, device transfer, forward, back to pixels
  kpjax_decode_seconds                           one upload: decode and prepare (decode threads)
  kpjax_queue_seconds                            an image's wait for its batch to start
  kpjax_in_flight                                predictions between upload and answer (gauge)

`endpoint` is the route (`/v1/predict`, ...), or `other` for unknown paths, so that a client cannot grow
the label set.
"""

from __future__ import annotations

import time

import prometheus_client

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
  """The server's counters and histograms (module docstring) and their text (`exposition`)."""

  def __init__(self, endpoints: tuple[str, ...], max_batch: int):
    self.endpoints = frozenset(endpoints)
    self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
    r = self.registry
    self.requests = prometheus_client.Counter('kpjax_requests', 'Requests answered', ('endpoint', 'status'),
                                              registry=r)
    self.errors = prometheus_client.Counter('kpjax_request_errors', 'Requests answered with a 4xx or 5xx status',
                                            ('endpoint', 'status'), registry=r)
    self.latency = prometheus_client.Histogram('kpjax_request_seconds', 'Request latency', ('endpoint',),
                                               buckets=LATENCY_BUCKETS, registry=r)
    sizes = tuple(float(b) for b in range(1, max_batch + 1))
    self.batch_size = prometheus_client.Histogram('kpjax_batch_size', 'Images per forward pass', buckets=sizes,
                                                  registry=r)
    self.padded_size = prometheus_client.Histogram('kpjax_batch_padded_size', 'Compiled batch shape of each pass',
                                                   buckets=sizes, registry=r)
    self.forward = prometheus_client.Histogram('kpjax_forward_seconds', 'Batch forward pass', buckets=LATENCY_BUCKETS,
                                               registry=r)
    self.decode = prometheus_client.Histogram('kpjax_decode_seconds', 'Decoding and preparing one upload',
                                              buckets=LATENCY_BUCKETS, registry=r)
    self.queue = prometheus_client.Histogram('kpjax_queue_seconds', "An image's wait for its batch",
                                             buckets=LATENCY_BUCKETS, registry=r)
    self.in_flight = prometheus_client.Gauge('kpjax_in_flight', 'Predictions between upload and answer', registry=r)

  def endpoint(self, path: str) -> str:
    return path if path in self.endpoints else 'other'

  def observe_request(self, path: str, status: int, seconds: float) -> None:
    endpoint = self.endpoint(path)
    self.requests.labels(endpoint, str(status)).inc()
    if status >= 400:
      self.errors.labels(endpoint, str(status)).inc()
    self.latency.labels(endpoint).observe(seconds)

  def observe_batch(self, size: int, padded: int, seconds: float) -> None:
    self.batch_size.observe(size)
    self.padded_size.observe(padded)
    self.forward.observe(seconds)

  def exposition(self) -> tuple[bytes, str]:
    """(the text of every metric, its content type)."""
    return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST


class MetricsMiddleware:
  """ASGI middleware recording every HTTP request's endpoint, status and latency in `metrics`."""

  def __init__(self, app, metrics: ServeMetrics):
    self.app = app
    self.metrics = metrics

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      await self.app(scope, receive, send)
      return
    start = time.perf_counter()
    status = 500  # if the app fails before it answers

    async def send_and_record(message):
      nonlocal status
      if message['type'] == 'http.response.start':
        status = int(message['status'])
      await send(message)

    try:
      await self.app(scope, receive, send_and_record)
    finally:
      self.metrics.observe_request(scope['path'], status, time.perf_counter() - start)
