"""Checkpoints of the train state, through orbax's CheckpointManager.

The state is saved as one copy on the host (numpy leaves): whether the step ran under pmap (replicated per device)
or jit (a replicated global array), the saved form is the same, so a checkpoint written on 8 GPUs restores on a CPU.
Every process calls save/restore (orbax coordinates them; only the primary process writes numpy leaves). orbax
writes each step into a temporary folder and renames it when complete, so a killed run never leaves a checkpoint
that looks whole but is not.
"""

from __future__ import annotations

import os
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
