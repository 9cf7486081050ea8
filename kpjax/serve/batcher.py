"""Dynamic batching: concurrent requests grouped into one call of a blocking batch function.

As TorchServe's `batch_size`/`max_batch_delay` and Triton's `dynamic_batching`: a batch starts once
`max_batch` requests of one kind wait, or `max_delay_s` after the oldest of them arrived, whichever comes
first. The batch function runs in a thread of its own (one batch at a time: the model's devices are busy
with it), so the event loop keeps reading requests meanwhile, and those gather into the next batch: under
load, batches fill without waiting for the delay at all.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Hashable, Sequence


@dataclasses.dataclass
class _Waiting:
  item: Any
  future: asyncio.Future
  arrived: float  # loop.time() seconds


class DynamicBatcher:
  """Groups the items of concurrent `submit` calls into batches for `run(key, items) -> results`.

  Items of different keys (e.g. with and without flip test-time augmentation, which run different
  compiled functions) never share a batch; the key whose oldest item waits longest goes first. `run`
  gets 1..max_batch items and returns one result per item, in order; if it raises, every request of
  that batch gets the exception, and the batcher carries on. A request cancelled while it waits (its
  client went away) is left out of its batch.
  """

  def __init__(self, run: Callable[[Hashable, Sequence[Any]], Sequence[Any]], *, max_batch: int,
               max_delay_s: float):
    if max_batch < 1:
      raise ValueError(f'max_batch must be at least 1; got {max_batch}')
    if max_delay_s < 0:
      raise ValueError(f'max_delay_s must be 0 or more; got {max_delay_s}')
    self._run = run
    self.max_batch = int(max_batch)
    self.max_delay_s = float(max_delay_s)
    self._queues: dict[Hashable, collections.deque[_Waiting]] = collections.defaultdict(collections.deque)
    self._arrived: asyncio.Event | None = None
    self._task: asyncio.Task | None = None
    self._executor: concurrent.futures.ThreadPoolExecutor | None = None

  async def start(self) -> None:
    """Starts the batching task on the running event loop (an ASGI app's lifespan start-up)."""
    self._arrived = asyncio.Event()
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='kpjax-batch')
    self._task = asyncio.get_running_loop().create_task(self._loop())

  async def close(self) -> None:
    """Stops batching; requests still waiting get CancelledError."""
    if self._task is not None:
      self._task.cancel()
      try:
        await self._task
      except asyncio.CancelledError:
        pass
    for queue in self._queues.values():
      for waiting in queue:
        waiting.future.cancel()
    self._queues.clear()
    if self._executor is not None:
      self._executor.shutdown(wait=True)

  def waiting(self) -> int:
    """Items queued and not yet in a batch."""
    return sum(len(q) for q in self._queues.values())

  async def submit(self, key: Hashable, item: Any) -> Any:
    """Queues `item` under `key` and returns its result once its batch has run."""
    if self._task is None or self._task.done():
      raise RuntimeError('the batcher is not running (start() it first)')
    loop = asyncio.get_running_loop()
    waiting = _Waiting(item, loop.create_future(), loop.time())
    self._queues[key].append(waiting)
    self._arrived.set()
    return await waiting.future

  async def _next_batch(self) -> tuple[Hashable, list[_Waiting]]:
    """Waits for the oldest waiting key's batch to fill or its delay to pass; takes it off its queue."""
    loop = asyncio.get_running_loop()
    while not any(self._queues.values()):
      self._arrived.clear()
      await self._arrived.wait()
    key = min((k for k, q in self._queues.items() if q), key=lambda k: self._queues[k][0].arrived)
    queue = self._queues[key]
    deadline = queue[0].arrived + self.max_delay_s
    while len(queue) < self.max_batch:
      timeout = deadline - loop.time()
      if timeout <= 0:
        break
      self._arrived.clear()
      try:
        await asyncio.wait_for(self._arrived.wait(), timeout)
      except asyncio.TimeoutError:
        break
    return key, [queue.popleft() for _ in range(min(len(queue), self.max_batch))]

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      key, batch = await self._next_batch()
      live = [w for w in batch if not w.future.done()]
      if not live:
        continue
      try:
        results = await loop.run_in_executor(self._executor, self._run, key, [w.item for w in live])
        if len(results) != len(live):
          raise RuntimeError(f'the batch function returned {len(results)} results for {len(live)} items')
      except Exception as e:  # pylint: disable=broad-except  (each request of the batch reports it)
        for w in live:
          if not w.future.done():
            w.future.set_exception(e)
        continue
      for w, result in zip(live, results):
        if not w.future.done():
          w.future.set_result(result)
