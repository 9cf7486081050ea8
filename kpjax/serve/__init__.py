"""Serving a kpjax model over HTTP: `python -m kpjax.serve` (kpjax.cli.serve), docs/serving.md.

`app` (the Starlette app: page, JSON API, health, metrics), `batcher` (dynamic batching), `runner` (the
model, compiled for fixed batch shapes), `metrics` (Prometheus), `static/` (the page: HTML, JS, CSS, no
build step, nothing fetched from the internet). Needs the serve extra: pip install 'kpjax[serve]'.
"""
