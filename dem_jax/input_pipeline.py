"""Batches of triplet tiles, read from the feature store ahead of the train step.

Hand-written rather than grain: a batch is already a pure function of (seed, step) (the sampler), the reads are
tensorstore futures that run concurrently and release the GIL, so a few threads prefetching whole batches keep the
step fed without grain's per-record worker processes, pickling and state checkpointing.
"""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np

from dem_jax.features import Features
from dem_jax.sampler import TripletSampler, read_tiles

ROLES = ('anchor', 'neighbour', 'distant')


class TripletLoader:
  """`loader.batch(step)` -> {'anchor', 'neighbour', 'distant'}: float32 [local_batch, T, M] numpy arrays.

  With several processes, each reads rows [process_index * local_batch, (process_index + 1) * local_batch) of the
  global batch. The next `prefetch` steps are read in the background while the caller works.
  """

  def __init__(self, features: Features, sampler: TripletSampler, global_batch: int, *, process_index: int = 0,
               process_count: int = 1, prefetch: int = 4, num_threads: int = 4):
    if global_batch % process_count:
      raise ValueError(f'The batch size ({global_batch}) must be divisible by the number of processes '
                       f'({process_count}); change config.batch_size.')
    self.features, self.sampler, self.global_batch = features, sampler, global_batch
    self.local_batch = global_batch // process_count
    self.rows = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)
    self.prefetch = prefetch
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix='triplet-loader')
    self._pending: dict[int, concurrent.futures.Future] = {}
    self._lock = threading.Lock()

  def _load(self, step: int) -> dict[str, np.ndarray]:
    triplets = self.sampler.sample(step, self.global_batch)
    batch = {}
    for role in ROLES:
      timelines, positions = getattr(triplets, role)
      batch[role] = read_tiles(self.features, self.sampler, timelines[self.rows], positions[self.rows])
    return batch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    with self._lock:
      for s in range(step, step + self.prefetch + 1):
        if s not in self._pending:
          self._pending[s] = self._pool.submit(self._load, s)
      for s in [s for s in self._pending if s < step]:  # Steps skipped over (e.g. after a restart).
        self._pending.pop(s).cancel()
      future = self._pending.pop(step)
    return future.result()

  def close(self) -> None:
    for future in self._pending.values():
      future.cancel()
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
