"""kpjax.serve.batcher.DynamicBatcher: concurrent requests share batches of at most max_batch, of one key
each, formed while the previous batch runs; failures reach every request of their batch and no other."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from kpjax.serve.batcher import DynamicBatcher


class Recorder:
  """A batch function that records its batches and answers (key, item * 10); it can block until released."""

  def __init__(self, fail_on=None):
    self.batches: list[tuple[object, list]] = []
    self.running = threading.Event()
    self.release = threading.Event()
    self.release.set()
    self.fail_on = fail_on

  def __call__(self, key, items):
    self.batches.append((key, list(items)))
    self.running.set()
    self.release.wait(30)
    if self.fail_on in items:
      raise RuntimeError(f'batch with {self.fail_on} failed')
    return [(key, item * 10) for item in items]


def _run(coroutine):
  return asyncio.run(asyncio.wait_for(coroutine, 60))


@contextlib.asynccontextmanager
async def _batcher(run, max_batch: int, max_delay_s: float):
  batcher = DynamicBatcher(run, max_batch=max_batch, max_delay_s=max_delay_s)
  await batcher.start()
  try:
    yield batcher
  finally:
    await batcher.close()


async def _occupied(batcher: DynamicBatcher, run: Recorder) -> asyncio.Future:
  """Submits item 0 and returns its future once its batch is running (and blocked in `run`)."""
  first = asyncio.ensure_future(batcher.submit('k', 0))
  await asyncio.get_running_loop().run_in_executor(None, run.running.wait, 30)
  return first


def test_concurrent_requests_share_batches_of_at_most_max_batch():
  run = Recorder()

  async def main():
    async with _batcher(run, 4, 0.05) as batcher:
      return await asyncio.gather(*(batcher.submit('k', i) for i in range(10)))

  results = _run(main())
  assert results == [('k', 10 * i) for i in range(10)]  # each request gets its own item's answer
  sizes = [len(items) for _, items in run.batches]
  assert sum(sizes) == 10 and max(sizes) == 4 and len(sizes) == 3
  assert sorted(i for _, items in run.batches for i in items) == list(range(10))


def test_requests_arriving_during_a_batch_form_the_next_one():
  """Under load the batches fill without the delay: with max_delay 0, a request alone runs at once, and
  those that arrive while it runs go together next."""
  run = Recorder()
  run.release.clear()

  async def main():
    async with _batcher(run, 8, 0.0) as batcher:
      first = await _occupied(batcher, run)
      later = [asyncio.ensure_future(batcher.submit('k', i)) for i in (1, 2, 3)]
      await asyncio.sleep(0.05)
      assert batcher.waiting() == 3
      run.release.set()
      return await asyncio.gather(first, *later)

  assert _run(main()) == [('k', 0), ('k', 10), ('k', 20), ('k', 30)]
  assert [items for _, items in run.batches] == [[0], [1, 2, 3]]


def test_keys_never_share_a_batch():
  run = Recorder()

  async def main():
    async with _batcher(run, 16, 0.05) as batcher:
      return await asyncio.gather(*(batcher.submit(i % 2 == 0, i) for i in range(9)))

  assert _run(main()) == [(i % 2 == 0, 10 * i) for i in range(9)]
  for key, items in run.batches:
    assert all((i % 2 == 0) == key for i in items)
  assert sorted(len(items) for _, items in run.batches) == [4, 5]


def test_a_failing_batch_fails_its_requests_only():
  run = Recorder(fail_on=3)

  async def main():
    async with _batcher(run, 2, 0.05) as batcher:
      return await asyncio.gather(*(batcher.submit('k', i) for i in range(6)), return_exceptions=True)

  results = _run(main())
  failed = [i for i, r in enumerate(results) if isinstance(r, RuntimeError)]
  batch = next(items for _, items in run.batches if 3 in items)
  assert failed == sorted(batch) and all('batch with 3 failed' in str(results[i]) for i in failed)
  assert all(results[i] == ('k', 10 * i) for i in range(6) if i not in failed)


def test_a_cancelled_request_is_left_out_of_its_batch():
  run = Recorder()
  run.release.clear()

  async def main():
    async with _batcher(run, 8, 0.0) as batcher:
      first = await _occupied(batcher, run)
      gone = asyncio.ensure_future(batcher.submit('k', 1))
      kept = asyncio.ensure_future(batcher.submit('k', 2))
      await asyncio.sleep(0.02)
      gone.cancel()  # its client went away while it waited
      run.release.set()
      return await asyncio.gather(first, kept)

  assert _run(main()) == [('k', 0), ('k', 20)]
  assert [items for _, items in run.batches] == [[0], [2]]


def test_a_wrong_number_of_results_is_an_error():
  async def main():
    async with _batcher(lambda key, items: [], 2, 0.0) as batcher:
      await batcher.submit('k', 1)

  with pytest.raises(RuntimeError, match='returned 0 results for 1 items'):
    _run(main())


def test_bad_settings_and_use_before_start():
  with pytest.raises(ValueError, match='max_batch'):
    DynamicBatcher(lambda k, i: i, max_batch=0, max_delay_s=0.0)
  with pytest.raises(ValueError, match='max_delay_s'):
    DynamicBatcher(lambda k, i: i, max_batch=1, max_delay_s=-1)
  with pytest.raises(RuntimeError, match='not running'):
    _run(DynamicBatcher(lambda k, i: i, max_batch=1, max_delay_s=0.0).submit('k', 1))
