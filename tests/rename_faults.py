"""A test helper: make os.rename / os.replace fail on chosen calls that touch a given target's folder."""

from __future__ import annotations

import os


def fail_renames(monkeypatch, target, calls, fn='rename'):
  """Makes os.<fn> raise on the given calls (1-based) among those that move `target` or a sibling of it;
  moves deeper down (inside a staging directory, e.g. orbax's or tfds's own) pass and do not count."""
  real = getattr(os, fn)
  parent = os.path.dirname(os.path.abspath(target))
  seen = []

  def maybe_fail(src, dst, **kwargs):
    if parent in (os.path.dirname(os.path.abspath(src)), os.path.dirname(os.path.abspath(dst))):
      seen.append((src, dst))
      if len(seen) in calls:
        raise OSError(f'injected failure of {fn} #{len(seen)}')
    return real(src, dst, **kwargs)

  monkeypatch.setattr(os, fn, maybe_fail)
  return seen
