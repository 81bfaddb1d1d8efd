"""The step compiled three ways (one device, pmap over 4, jit over a 4-device mesh) gives the same training."""

import jax
import ml_collections
import numpy as np
import optax
import pytest

from dem_jax import losses
from dem_jax import models
from dem_jax import train_step as step_lib

TILE = (16, 16)
BATCH = 8


def tiny_model(axis_name=None, dropout=0.0, conv_impl='xla'):
  # XLA's convolution compiles about twice as fast as im2col; tests/test_models.py checks the two agree.
  config = ml_collections.ConfigDict(dict(name='resnet18', width=0.125, embedding_dim=8, dropout_rate=dropout,
                                          conv_impl=conv_impl, dtype='float32'))
  return models.create_model(config, band_mean=[0.5] * TILE[1], band_std=[2.0] * TILE[1], axis_name=axis_name)


def optimizer_config(**kw):
  return ml_collections.ConfigDict(dict(learning_rate=1e-3, decay_rate=0.5, decay_steps=2, weight_decay=1e-3,
                                        grad_clip_norm=0.0) | kw)


def batches(n):
  rng = np.random.default_rng(0)
  return [{r: rng.standard_normal((BATCH,) + TILE).astype(np.float32) for r in step_lib.ROLES} for _ in range(n)]


class CompileCounter:
  """Counts XLA compilations while active (jax.monitoring's backend-compile events)."""

  def __init__(self):
    self.count, self.active = 0, False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    if self.active and event == '/jax/core/compile/backend_compile_duration':
      self.count += 1


COMPILES = CompileCounter()


def run(mode, devices, steps=4):
  """Losses, final host state and compilations after the first step, for `steps` steps on fixed batches."""
  parallel = step_lib.DataParallel(mode, devices=devices)
  model = tiny_model(parallel.axis_name)
  # Plain SGD: Adam divides by sqrt(v), which turns float noise in near-zero gradients into full-size steps and
  # would hide what this compares (the gradient and BatchNorm reductions across devices).
  optimizer = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.001))
  state = step_lib.create_train_state(jax.random.key(0), model, optimizer, TILE)
  # A margin no triplet reaches keeps every hinge active: the mean over active triplets has a fixed denominator, so
  # float rounding cannot flip a triplet in or out and jump the loss.
  loss_fn = losses.get_loss_fn('triplet', margin=10.0)
  step = parallel.compile_train_step(step_lib.make_train_step(model, optimizer, loss_fn, axis_name=parallel.axis_name))
  device_state = parallel.put_state(state)
  history = []
  for i, batch in enumerate(batches(steps)):
    COMPILES.active, COMPILES.count = i > 0, 0 if i == 1 else COMPILES.count
    device_state, metrics = step(device_state, parallel.put_batch(batch), jax.random.key(1))
    history.append(parallel.get_metrics(metrics)['loss'])
  COMPILES.active = False
  return np.array(history), parallel.get_state(device_state), COMPILES.count


@pytest.fixture(scope='module')
def runs():
  assert len(jax.devices()) >= 4, 'tests run with 4 fake CPU devices (tests/conftest.py)'
  return {'single': run('jit', jax.devices()[:1]), 'pmap': run('pmap', jax.devices()[:4]),
          'jit': run('jit', jax.devices()[:4])}


@pytest.mark.parametrize('mode', ['pmap', 'jit'])
def test_four_devices_agree_with_one(runs, mode):
  losses_1, state_1, _ = runs['single']
  losses_4, state_4, _ = runs[mode]
  np.testing.assert_allclose(losses_4, losses_1, rtol=1e-5, atol=1e-6)
  assert int(state_4.step) == int(state_1.step) == 4
  for a, b in zip(jax.tree.leaves(state_4.params), jax.tree.leaves(state_1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(state_4.batch_stats), jax.tree.leaves(state_1.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('mode', ['single', 'pmap', 'jit'])
def test_no_recompilation_after_the_first_step(runs, mode):
  assert runs[mode][2] == 0


def test_training_lowers_the_loss_on_a_fixed_batch():
  parallel = step_lib.DataParallel('jit', devices=jax.devices()[:1])
  model = tiny_model()
  optimizer = step_lib.make_optimizer(optimizer_config(learning_rate=1e-2, decay_steps=1000))
  state = parallel.put_state(step_lib.create_train_state(jax.random.key(0), model, optimizer, TILE))
  step = parallel.compile_train_step(step_lib.make_train_step(model, optimizer, losses.get_loss_fn('triplet')))
  batch = batches(1)[0]
  batch['neighbour'] = batch['anchor'] + 0.1 * batch['neighbour']  # A learnable task: neighbours look alike.
  history = []
  for _ in range(30):
    state, metrics = step(state, parallel.put_batch(batch), jax.random.key(0))
    history.append(parallel.get_metrics(metrics)['d_pos'] - parallel.get_metrics(metrics)['d_neg'])
  assert np.mean(history[-5:]) < np.mean(history[:5]) - 0.1


def test_staircase_learning_rate():
  config = optimizer_config(learning_rate=1e-4, decay_rate=0.95, decay_steps=7500)
  assert step_lib.learning_rate_at(config, 7499) == pytest.approx(1e-4)
  assert step_lib.learning_rate_at(config, 7500) == pytest.approx(0.95e-4)
  assert step_lib.learning_rate_at(config, 15000) == pytest.approx(0.95 ** 2 * 1e-4)


def test_weight_decay_touches_kernels_only():
  model = tiny_model()
  optimizer = step_lib.make_optimizer(optimizer_config(weight_decay=1.0))
  state = step_lib.create_train_state(jax.random.key(0), model, optimizer, TILE)
  zeros = jax.tree.map(np.zeros_like, state.params)
  updates, _ = optimizer.update(zeros, state.opt_state, state.params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  kernels = [np.abs(u).max() for path, u in flat if path[-1].key == 'kernel']
  others = [np.abs(u).max() for path, u in flat if path[-1].key != 'kernel']
  assert kernels and others and min(kernels) > 0 and max(others) == 0


def test_batch_not_divisible_by_devices_names_the_setting():
  parallel = step_lib.DataParallel('pmap', devices=jax.devices()[:4])
  with pytest.raises(ValueError, match='batch_size'):
    parallel.put_batch({'anchor': np.zeros((6,) + TILE, np.float32)})
