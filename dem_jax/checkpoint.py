"""Checkpoints of the train state, through orbax's CheckpointManager.

The state is saved as one copy on the host (numpy leaves): whether the step ran under pmap (replicated per device)
or jit (a replicated global array), the saved form is the same, so a checkpoint written on 8 GPUs restores on a CPU.
Every process calls save/restore (orbax coordinates them; only the primary process writes numpy leaves). orbax
writes each step into a temporary folder and renames it when complete, so a killed run never leaves a checkpoint
that looks whole but is not; a writable Checkpointer deletes such temporary folders when it opens.

A save is synchronous: `save()` returns once the step is on disk, or raises. A write that fails (a full disk, a
quota, a disk error) raises OSError naming the checkpoint folder (the dispatcher prints it as one line with the
fix), its temporary folder is deleted, and orbax's own reports of the failure (a traceback per thread) are held
back. Older steps are pruned to `max_to_keep` only after the new step was written whole, and a state that is not
finite is never saved (CheckpointError), so pruning never removes the newest intact step.

Each step holds two orbax items: `state`, the train state's arrays, and `progress`, a small JSON object of the
trainer's own state that must survive a restart with the weights (the time budget's clock and the learning-rate
schedule's length; big_vision keeps its `chrono` in the checkpoint likewise), so that a resumed run continues from
the checkpoint alone, whatever became of its logs. Steps saved before the progress item existed hold the state as
orbax's single unnamed item (`default`); they are read as before and have no progress (`progress()` is None).

What guards against a checkpoint that is whole but wrong:
- Once orbax has finished a step, the primary process writes `digest.json` into the step's folder: the sha256 of
  the step's files, and whether every saved float was finite (always, since a non-finite state is refused; steps
  saved by an older dem_jax may say otherwise). A step whose files no longer match (flipped bytes, a truncated
  file) or that held non-finite values is damaged: `latest_step()` skips it with a warning and returns the
  newest intact step, and `restore()` falls back to it. Restored arrays are checked to be finite as well, so a step
  without a digest (a run killed between orbax's rename and the digest) is still never restored with NaN/inf.
- `Checkpointer(workdir, read_only=True)` is for readers (embed, evaluate): it creates no folder, deletes nothing
  (no clean-up of temporary folders, no pruning to max_to_keep) and saves nothing, so a reader can open a workdir
  while training saves into it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

UNFINISHED_CLEANUP_TRIES = 40  # Passes over a failed save's temporary folder, 50 ms apart.

CHECKPOINT_DIR = 'checkpoints'
DIGEST_NAME = 'digest.json'  # In each step's folder, written after orbax finished the step.
SET_ASIDE_DIR = 'checkpoints_set_aside'  # Steps a resumed run could not use, kept rather than deleted.
MODEL_INFO = 'model.json'  # What inference needs besides the weights: model config, normaliser, tile, front end.
STATE_ITEM = 'state'
PROGRESS_ITEM = 'progress'
LEGACY_STATE_ITEM = 'default'  # Where a step saved without a progress item holds its state (orbax's unnamed item).


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: damaged, non-finite, or a save asked of a read-only Checkpointer."""


def write_model_info(workdir: str, info: dict) -> None:
  tmp = os.path.join(workdir, MODEL_INFO + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=1)
  os.replace(tmp, os.path.join(workdir, MODEL_INFO))


def read_model_info(workdir: str) -> dict:
  path = os.path.join(workdir, MODEL_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: {workdir} is not a training workdir (train with dem-jax train '
                            '--workdir=... first).')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def files_digest(step_dir: str) -> str:
  """sha256 over the relative path and bytes of every file of a step's folder (the digest file excepted)."""
  digest = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(step_dir):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      relative = os.path.relpath(path, step_dir)
      if relative.startswith(DIGEST_NAME):  # The digest itself and its temporary file.
        continue
      digest.update(relative.encode() + b'\0')
      with open(path, 'rb') as f:
        digest.update(hashlib.file_digest(f, 'sha256').digest())
  return digest.hexdigest()


def all_finite(tree: Any) -> bool:
  """Whether every floating-point leaf of a pytree is free of NaN and inf."""
  return all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(leaf).dtype, np.inexact))


@contextlib.contextmanager
def _failure_reports_held_back():
  """While orbax saves: its threads log a failed write with a traceback each, and its event loops' teardown prints
  one more ('Event loop is closed', raised in a late callback); `Checkpointer.save` reports a failure once itself,
  so these are dropped when the save raises, and let through when it returns. Orbax's threads can still report the
  failed write after the save raised (a late log record, an unraisable exception at exit), so after a failure the
  filter and the hook that drop them stay."""
  held = []

  class Hold(logging.Filter):

    def filter(self, record: logging.LogRecord) -> bool:
      if record.levelno >= logging.ERROR and '/orbax/' in record.pathname:
        held.append(record)
        return False
      return True

  def drop_reported(unraisable):
    e = unraisable.exc_value
    closed_loop = isinstance(e, RuntimeError) and 'Event loop is closed' in str(e)
    failed_write = isinstance(e, ValueError) and _save_error(e, '') is not None
    if not (closed_loop or failed_write):
      previous_hook(unraisable)

  logger, hold, previous_hook = logging.getLogger('absl'), Hold(), sys.unraisablehook  # orbax logs through absl.
  logger.addFilter(hold)
  sys.unraisablehook = drop_reported
  failed = True
  try:
    yield
    failed = False
  finally:
    if not failed:
      logger.removeFilter(hold)
      sys.unraisablehook = previous_hook
      for record in held:
        logger.handle(record)


def _save_error(e: Exception, directory: str) -> OSError | None:
  """A failed save as the OSError to raise (with errno and the folder) when the operating system refused a write,
  which tensorstore reports as a ValueError with the OS's code in its text; None for any other error, which is
  raised as it is (a bug must keep its traceback)."""
  if isinstance(e, OSError):
    return e if e.filename else OSError(e.errno, e.strerror or str(e), directory)
  text = str(e)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    number = int(code.group(1))
  elif 'No space left on device' in text:
    number = errno.ENOSPC
  else:
    return None
  return OSError(number, os.strerror(number), directory)


class Checkpointer:
  """Saves and restores the train state in `<workdir>/checkpoints`; see the module docstring for the guarantees."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, save_every: int = 1000, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.save_every = save_every
    self.read_only = read_only
    self._pending: dict[int, bool] = {}  # Steps saved by this process without a digest yet -> all finite.
    self._damage: dict[int, str | None] = {}  # Verified steps -> why damaged (None: intact).
    self._warned: set[int] = set()
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                             max_to_keep=None, save_interval_steps=0)
      # A workdir without checkpoints yet has nothing to read; orbax is not asked to look (or create).
      self.manager = ocp.CheckpointManager(self.directory, options=options) if os.path.isdir(self.directory) else None
    else:
      # Synchronous: a failed write then raises in save(), at its step, instead of in orbax's background threads
      # while training goes on; and orbax prunes older steps only once the new one is whole.
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=False))

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _steps(self) -> list[int]:
    if self.manager is None:
      return []
    if self.read_only:
      self.manager.reload()  # Another process (training) may have saved or pruned steps since.
    return sorted(self.manager.all_steps())

  def damage(self, step: int) -> str | None:
    """Why a saved step is damaged (its files do not match its digest, or it held non-finite values), else None.

    A step without a digest counts as intact here; restoring it still checks that its values are finite.
    """
    if step in self._damage:
      return self._damage[step]
    digest_path = os.path.join(self._step_dir(step), DIGEST_NAME)
    if not os.path.exists(digest_path):
      return None  # Not cached: the digest may still be written.
    try:
      with open(digest_path, encoding='utf-8') as f:
        recorded = json.load(f)
      if recorded.get('sha256') != files_digest(self._step_dir(step)):
        reason = "its files do not match the digest written when it was saved (damaged on disk)"
      elif not recorded.get('finite', True):
        reason = 'it holds non-finite values (NaN or inf)'
      else:
        reason = None
    except (OSError, ValueError, UnicodeDecodeError) as e:
      reason = f'its digest cannot be checked ({e})'
    self._damage[step] = reason
    return reason

  def _warn_damaged(self, step: int, reason: str) -> None:
    if step not in self._warned:
      self._warned.add(step)
      logging.warning('Checkpoint step %d in %s is damaged: %s; it is skipped.', step, self.directory, reason)

  def intact_steps(self) -> list[int]:
    """Saved steps that are not damaged, oldest first (damaged ones are skipped with a warning)."""
    intact = []
    for step in self._steps():
      reason = self.damage(step)
      if reason:
        self._warn_damaged(step, reason)
      else:
        intact.append(step)
    return intact

  def latest_step(self) -> int | None:
    """The newest intact step, or None."""
    for step in reversed(self._steps()):
      reason = self.damage(step)
      if reason is None:
        return step
      self._warn_damaged(step, reason)
    return None

  def all_steps(self) -> list[int]:
    """Every saved step, damaged or not."""
    return self._steps()

  def _write_digests(self) -> None:
    """Digests of this process's finished saves."""
    for step in sorted(self._pending):
      finite = self._pending.pop(step)
      step_dir = self._step_dir(step)
      if jax.process_index() != 0 or not os.path.isdir(step_dir):  # Pruned meanwhile: nothing to describe.
        continue
      path = os.path.join(step_dir, DIGEST_NAME)
      tmp = f'{path}.tmp'
      try:
        with open(tmp, 'w', encoding='utf-8') as f:
          json.dump({'step': step, 'sha256': files_digest(step_dir), 'finite': finite}, f)
        os.replace(tmp, path)
      except OSError as e:  # A failed write names no file; the one-line report needs it. The step stays usable.
        raise OSError(e.errno, e.strerror, e.filename or tmp) from None

  def save(self, step: int, state: Any, *, force: bool = False, progress: dict | None = None) -> bool:
    """Saves `state` (a pytree; device arrays are fetched to the host) at `step` if due, or always with force.

    `progress`, a JSON-able dict (the primary process's is written), goes into the same step as the state: one folder
    that orbax completes or discards as a whole, under one digest, so the two always belong together. A state with
    NaN or inf raises CheckpointError and nothing is written; a write the operating system refused raises OSError,
    and either leaves the steps saved before it as they were.
    """
    if self.read_only:
      raise CheckpointError(f'This Checkpointer of {self.directory} is read-only; open it without read_only to save.')
    if not force and step % self.save_every:
      return False
    host_state = jax.tree.map(np.asarray, flax.serialization.to_state_dict(jax.device_get(state)))
    if not all_finite(host_state):
      raise CheckpointError(f'The state of step {step} holds non-finite values (NaN or inf); it was not saved, and '
                            f'{self.directory} keeps its steps (the newest intact: {self.latest_step()}).')
    items = {STATE_ITEM: ocp.args.StandardSave(host_state)}
    if progress is not None:
      items[PROGRESS_ITEM] = ocp.args.JsonSave(dict(progress))
    try:
      with _failure_reports_held_back():
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # orbax and tensorstore raise many types for a failed write.
      self._discard_unfinished(step)
      error = _save_error(e, self.directory)
      if error is None:
        raise
      raise error from None
    if saved:
      self._pending[step] = True
    self._write_digests()
    return saved

  def _discard_unfinished(self, step: int) -> None:
    """Deletes the temporary folder of a save that failed: it holds no usable step, and may hold the space the
    disk lacks. (A writable Checkpointer opened later deletes any such folder as well.)"""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    # orbax's writer threads can still be creating files there just after the error: delete until none has been
    # seen for a few passes in a row.
    quiet = 0
    for _ in range(UNFINISHED_CLEANUP_TRIES):
      unfinished = [name for name in os.listdir(self.directory) if name.startswith(f'{step}.orbax-checkpoint-tmp')]
      quiet = 0 if unfinished else quiet + 1
      if quiet == 3:
        break
      for name in unfinished:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      time.sleep(0.05)
    try:
      self.manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass  # Best effort: the error being raised is what matters.

  def _candidates(self, step: int | None):
    """Steps to try to restore, newest first: the given one only, or each intact one (verified as it is reached)."""
    if step is not None:
      if step not in self._steps():
        raise FileNotFoundError(f'No checkpoint for step {step} in {self.directory}; saved steps: {self._steps()}.')
      reason = self.damage(step)
      if reason:
        raise CheckpointError(f'Checkpoint step {step} in {self.directory} is damaged: {reason}. Restore another '
                              f'step (intact: {self.intact_steps()}), or leave the step out to use the newest intact '
                              'one.')
      yield step
      return
    for candidate in reversed(self._steps()):
      reason = self.damage(candidate)
      if reason:
        self._warn_damaged(candidate, reason)
      else:
        yield candidate

  def _read_state(self, step: int, template: Any = None) -> Any:
    args = ocp.args.StandardRestore(template)
    if os.path.isdir(os.path.join(self._step_dir(step), STATE_ITEM)):
      return self.manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: args}))[STATE_ITEM]
    # A step saved before the progress item: read its one unnamed item directly, since a manager that restored it
    # would lock itself into orbax's single-item mode and could no longer save both items.
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as legacy:
      return legacy.restore(os.path.join(self._step_dir(step), LEGACY_STATE_ITEM), args=args)

  def _restore_first_intact(self, step: int | None, restore_one) -> Any:
    failures = []
    for candidate in self._candidates(step):
      try:
        restored = restore_one(candidate)
        reason = None if all_finite(restored) else 'it holds non-finite values (NaN or inf)'
      except Exception as e:  # orbax and tensorstore raise many types for unreadable data; all mean "damaged".
        reason = f'it cannot be read ({type(e).__name__}: {str(e)[:200]})'
      if reason is None:
        return restored
      if step is not None:
        raise CheckpointError(f'Checkpoint step {step} in {self.directory} is damaged: {reason}. Restore another '
                              'step, or leave the step out to use the newest intact one.')
      self._damage[candidate] = reason
      self._warn_damaged(candidate, reason)
      failures.append(candidate)
    raise CheckpointError(f'No intact checkpoint in {self.directory} (damaged: steps '
                          f'{sorted(set(self._steps()) - set(self.intact_steps()) | set(failures))}); train again in '
                          'a new workdir.')

  def restore(self, target: Any, step: int | None = None) -> Any:
    """The state saved at `step` (default: the newest intact step), in the structure of `target`, as numpy leaves.

    Without a step, a damaged checkpoint is skipped with a warning and the one before it is used; a step that is
    named and damaged raises CheckpointError.
    """
    if not self._steps():
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    template = jax.tree.map(np.asarray, flax.serialization.to_state_dict(jax.device_get(target)))
    restored = self._restore_first_intact(step, lambda s: self._read_state(s, template))
    return flax.serialization.from_state_dict(target, restored)

  def progress(self, step: int) -> dict | None:
    """The `progress` saved with `step`, or None when the step was saved without one (by an older dem_jax)."""
    if not os.path.isdir(os.path.join(self._step_dir(step), PROGRESS_ITEM)):
      return None
    reason = self.damage(step)
    if reason is None:
      try:
        return dict(self.manager.restore(step, args=ocp.args.Composite(
            **{PROGRESS_ITEM: ocp.args.JsonRestore()}))[PROGRESS_ITEM])
      except Exception as e:  # As in _restore_first_intact: unreadable means damaged.
        reason = f'its progress cannot be read ({type(e).__name__}: {str(e)[:200]})'
    raise CheckpointError(f'Checkpoint step {step} in {self.directory} is damaged: {reason}. Move its folder out '
                          f'of {self.directory} to resume from the step before it.')

  def set_aside_after(self, step: int) -> list[int]:
    """Moves every saved step later than `step` (damaged ones a resumed run skipped) to
    `<workdir>/checkpoints_set_aside/<step>`, so that training from `step` can save those steps again without
    deleting anything. Returns the steps moved. Every process calls it; the primary one moves."""
    if self.read_only:
      raise CheckpointError(f'This Checkpointer of {self.directory} is read-only; open it without read_only.')
    later = [s for s in self._steps() if s > step]
    if later and jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), SET_ASIDE_DIR)
      os.makedirs(aside, exist_ok=True)
      for s in later:
        target = os.path.join(aside, str(s))
        suffix = 1
        while os.path.exists(target):
          target = os.path.join(aside, f'{s}.{suffix}')
          suffix += 1
        os.replace(self._step_dir(s), target)
        logging.warning('Checkpoint step %d, newer than the one this run resumes from (%d), moved to %s.', s, step,
                        target)
    if later:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('dem_jax.checkpoint.set_aside_after')
      for s in later:
        self._damage.pop(s, None)
      self.manager.reload()
    return later

  def restore_raw(self, step: int | None = None) -> dict:
    """The saved state as nested dicts of numpy arrays, without a template (for inference: params, batch_stats)."""
    if not self._steps():
      raise FileNotFoundError(f'No checkpoint in {self.directory}; train first, or check --workdir.')
    return self._restore_first_intact(step, self._read_state)

  def wait(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self._write_digests()

  def close(self) -> None:
    if self.manager is not None:
      self.wait()
      self.manager.close()
