"""Checkpoints of the train state, through orbax's CheckpointManager.

The state is saved as one copy on the host (numpy leaves): whether the step ran under pmap (replicated per device)
or jit (a replicated global array), the saved form is the same, so a checkpoint written on 8 GPUs restores on a CPU.
Every process calls save/restore (orbax coordinates them; only the primary process writes numpy leaves). orbax
writes each step into a temporary folder and renames it when complete, so a killed run never leaves a checkpoint
that looks whole but is not.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'
MODEL_INFO = 'model.json'  # What inference needs besides the weights: model config, normaliser, tile, front end.


def write_model_info(workdir: str, info: dict) -> None:
  tmp = os.path.join(workdir, MODEL_INFO + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=1)
  os.replace(tmp, os.path.join(workdir, MODEL_INFO))


def read_model_info(workdir: str) -> dict:
  path = os.path.join(workdir, MODEL_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: {workdir} is not a training workdir (train with ./launch.sh train '
                            '--workdir=... first).')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, save_every: int = 1000):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves `state` (a pytree; device arrays are fetched to the host) at `step` if due, or always with force."""
    if not force and step % self.save_every:
      return False
    host_state = jax.tree.map(np.asarray, flax.serialization.to_state_dict(jax.device_get(state)))
    return self.manager.save(step, args=ocp.args.StandardSave(host_state), force=force)

  def restore(self, target: Any, step: int | None = None) -> Any:
    """The state saved at `step` (default: the latest), in the structure of `target`, as numpy leaves."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    template = jax.tree.map(np.asarray, flax.serialization.to_state_dict(jax.device_get(target)))
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(template))
    return flax.serialization.from_state_dict(target, restored)

  def restore_raw(self, step: int | None = None) -> dict:
    """The saved state as nested dicts of numpy arrays, without a template (for inference: params, batch_stats)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}; train first, or check --workdir.')
    if step not in self.all_steps():
      raise FileNotFoundError(f'No checkpoint for step {step} in {self.directory}; saved steps: {self.all_steps()}.')
    return self.manager.restore(step, args=ocp.args.StandardRestore())

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
