"""The step compiled three ways (one device, pmap over 4, jit over a 4-device mesh) trains the same model."""

import os

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '4')

import contextlib  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from dem_jax import losses  # noqa: E402
from dem_jax import models  # noqa: E402
from dem_jax import train_step as step_lib  # noqa: E402
from dem_jax.input_pipeline import host_batch_fn  # noqa: E402
from dem_jax.parallel import DataParallel  # noqa: E402

TILE = (32, 16)
BATCH = 8
LOSS = losses.get_loss_fn('triplet', margin=1.0)
# Plain SGD for the comparisons: Adam divides by the gradient's running scale, which turns float rounding in
# near-zero gradient entries into steps of the full learning rate and hides real differences.
SGD = optax.sgd(0.01)


def tiny_model():
  # One block per stage: what these tests check does not depend on depth, and it halves compilation time.
  return models.ResNet(stage_sizes=(1, 1, 1, 1), width=0.125, embedding_dim=8, dropout_rate=0.0,
                       band_mean=(0.5,) * TILE[1], band_std=(2.0,) * TILE[1])


def optimizer_config(**kw):
  return ml_collections.ConfigDict(dict(learning_rate=1e-3, decay_rate=0.95, decay_steps=7500, weight_decay=1e-4,
                                        grad_clip_norm=0.0) | kw)


def batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{r: rng.standard_normal((BATCH,) + TILE).astype(np.float32) for r in step_lib.ROLES} for _ in range(n)]


@contextlib.contextmanager
def count_compilations():
  counter = []
  listener = lambda event, duration, **kw: counter.append(event) if event.endswith('backend_compile_duration') else 0
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope='module')
def initial_state():
  return jax.device_get(step_lib.create_train_state(jax.random.key(0), tiny_model(), SGD, TILE))


@pytest.fixture(scope='module')
def runs(initial_state):
  """Three SGD steps on the same batches from the same state, for each way of running the step."""
  assert len(jax.devices()) >= 4, 'these tests need 4 fake CPU devices (JAX_NUM_CPU_DEVICES=4)'
  out = {}
  for name, mode, devices in [('single', 'jit', jax.devices()[:1]), ('pmap', 'pmap', jax.devices()[:4]),
                              ('jit', 'jit', jax.devices()[:4])]:
    parallel = DataParallel(mode, devices=devices)
    model = tiny_model()  # no axis name: the pmap step sets BatchNorm's to its own
    step = parallel.compile_train_step(step_lib.make_train_step(model, SGD, LOSS, axis_name=parallel.axis_name))
    state = parallel.put_state(initial_state)
    history = []
    for batch in batches(3):
      state, metrics = step(state, parallel.put_batch(batch), jax.random.key(1), np.float32(1.0))
      history.append(parallel.get_metrics(metrics))
    out[name] = dict(parallel=parallel, model=model, step=step, state=state, history=history)
  return out


@pytest.mark.parametrize('name', ['pmap', 'jit'])
def test_four_devices_train_like_one(runs, name):
  single, parallel = runs['single'], runs[name]
  for key in ('loss', 'grad_norm', 'active_fraction', 'd_pos'):
    np.testing.assert_allclose([m[key] for m in parallel['history']], [m[key] for m in single['history']],
                               rtol=1e-4, err_msg=key)
  state_1 = single['parallel'].get_state(single['state'])
  state_4 = parallel['parallel'].get_state(parallel['state'])
  assert int(state_4.step) == 3
  # BatchNorm running statistics too: in pmap mode they come from batch statistics averaged across devices.
  for a, b in zip(jax.tree.leaves((state_4.params, state_4.batch_stats)),
                  jax.tree.leaves((state_1.params, state_1.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', ['single', 'pmap', 'jit'])
def test_no_recompilation_after_the_first_step(runs, name):
  run = runs[name]
  with count_compilations() as compiled:
    for batch in batches(2, seed=1):
      run['state'], metrics = run['step'](run['state'], run['parallel'].put_batch(batch), jax.random.key(2),
                                          np.float32(1.0))
      run['parallel'].get_metrics(metrics)
  assert compiled == []


def test_eval_step_agrees_across_devices_and_with_the_embeddings(runs):
  batch = batches(1, seed=2)[0]
  results = {}
  for name in ('single', 'pmap'):
    run = runs[name]
    eval_step = run['parallel'].compile_eval_step(
        step_lib.make_eval_step(run['model'], LOSS, axis_name=run['parallel'].axis_name))
    results[name] = run['parallel'].get_metrics(eval_step(run['state'], run['parallel'].put_batch(batch)))
  assert results['pmap'] == pytest.approx(results['single'], rel=1e-4)
  # The held-out loss is the loss of what the embedding function produces (running statistics, no dropout).
  state = runs['single']['parallel'].get_state(runs['single']['state'])
  embed = step_lib.make_embed_fn(runs['single']['model'])
  z = {r: embed({'params': state.params, 'batch_stats': state.batch_stats}, batch[r]) for r in step_lib.ROLES}
  np.testing.assert_allclose(np.linalg.norm(z['anchor'], axis=-1), 1.0, rtol=1e-5)
  _, expected = LOSS(z['anchor'], z['neighbour'], z['distant'])
  assert results['single'] == pytest.approx({k: float(v) for k, v in expected.items()}, rel=1e-4)


def test_non_finite_step_is_reported_and_leaves_the_state_alone(runs):
  run = runs['single']
  before = run['parallel'].get_state(run['state'])
  batch = batches(1, seed=3)[0]
  batch['anchor'][0, 0, 0] = np.nan
  run['state'], metrics = run['step'](run['state'], run['parallel'].put_batch(batch), jax.random.key(3),
                                        np.float32(1.0))
  metrics = run['parallel'].get_metrics(metrics)
  assert np.isnan(metrics['loss']) and metrics['finite'] == 0.0
  after = run['parallel'].get_state(run['state'])
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  # Finite inputs, a learning rate that is not: the loss and gradient are finite, the state the update makes is not.
  run['state'], metrics = run['step'](run['state'], run['parallel'].put_batch(batches(1, seed=3)[0]),
                                      jax.random.key(3), np.float32(np.nan))
  metrics = run['parallel'].get_metrics(metrics)
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
  assert metrics['state_finite'] == 0.0 and metrics['finite'] == 0.0
  for a, b in zip(jax.tree.leaves(run['parallel'].get_state(run['state'])), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_training_pulls_neighbours_closer_than_distant_tiles(runs):
  run = runs['single']
  batch = batches(1, seed=4)[0]
  batch['neighbour'] = batch['anchor'] + 0.1 * batch['neighbour']  # A learnable task: neighbours look alike.
  placed = run['parallel'].put_batch(batch)
  gaps = []
  for i in range(15):
    run['state'], metrics = run['step'](run['state'], placed, jax.random.key(i), np.float32(1.0))
    metrics = run['parallel'].get_metrics(metrics)
    gaps.append(metrics['d_neg'] - metrics['d_pos'])
  assert np.mean(gaps[-3:]) > np.mean(gaps[:3]) + 0.1


def test_staircase_learning_rate():
  config = optimizer_config(learning_rate=1e-4, decay_rate=0.95, decay_steps=7500)
  assert step_lib.learning_rate_at(config, 7499) == pytest.approx(1e-4)
  assert step_lib.learning_rate_at(config, 7500) == pytest.approx(0.95e-4)
  assert step_lib.learning_rate_at(config, 15000) == pytest.approx(0.95 ** 2 * 1e-4)
  # The optimiser gives Adam's direction; the step scales it: for a constant unit gradient m / sqrt(v) = 1, so a
  # step moves each weight by the learning rate it was given.
  optimizer = step_lib.make_optimizer(optimizer_config(weight_decay=0.0))
  params = {'w': np.zeros(3, np.float32)}
  update, _ = optimizer.update({'w': np.ones(3, np.float32)}, optimizer.init(params), params)
  np.testing.assert_allclose(update['w'], -1.0, rtol=1e-3)


def test_cosine_learning_rate_warms_up_then_decays_to_its_floor():
  config = optimizer_config(learning_rate=1e-3, schedule='cosine', warmup_steps=10, final_fraction=0.1,
                            schedule_steps=0)
  lr = step_lib.learning_rate_at(config, np.arange(0, 130), total_steps=110)
  np.testing.assert_allclose(lr[:10], 1e-3 * np.arange(1, 11) / 10, rtol=1e-5)
  assert np.all(np.diff(lr[10:110]) <= 1e-12) and lr[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-4)
  np.testing.assert_allclose(lr[110:], 1e-4, rtol=1e-5)
  with pytest.raises(ValueError, match='num_steps'):
    step_lib.learning_rate_at(config, 5)
  with pytest.raises(ValueError, match='schedule'):
    step_lib.learning_rate_at(optimizer_config(schedule='linear'), 5)


def test_weight_decay_touches_kernels_only(initial_state):
  optimizer = step_lib.make_optimizer(optimizer_config(weight_decay=1.0))
  params = initial_state.params
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  kernels = [np.abs(u).max() for path, u in flat if path[-1].key == 'kernel']
  others = [np.abs(u).max() for path, u in flat if path[-1].key != 'kernel']
  assert len(kernels) == 13 and min(kernels) > 0  # 12 convolutions and the head
  assert others and max(others) == 0


def test_gradient_clipping_bounds_the_update():
  config = optimizer_config(weight_decay=0.0, grad_clip_norm=1.0)
  clipped = step_lib.make_optimizer(config)
  params = {'w': np.zeros(4, np.float32)}
  # Adam's first step is lr * sign(g) whatever the scale, so look at its second moment: (1 - b2) * g^2 of the
  # gradient after clipping, 100 / |(100, 100, 100, 100)| = 0.5 per entry.
  _, state = clipped.update({'w': np.full(4, 100.0, np.float32)}, clipped.init(params), params)
  np.testing.assert_allclose(optax.tree.get(state, 'nu')['w'], 0.001 * 0.5 ** 2, rtol=1e-4)


def test_batch_not_divisible_by_devices_names_the_setting():
  parallel = DataParallel('pmap', devices=jax.devices()[:4])
  with pytest.raises(ValueError, match='batch_size'):
    parallel.put_batch({'anchor': np.zeros((6,) + TILE, np.float32)})


def test_step_built_for_the_wrong_mode_is_refused():
  parallel = DataParallel('pmap', devices=jax.devices()[:4])
  step = step_lib.make_train_step(tiny_model(), SGD, LOSS, axis_name=None)
  with pytest.raises(ValueError, match='axis_name'):
    parallel.compile_train_step(step)


def loop_inputs(parallel, steps, nan_at=None):
  data = batches(steps, seed=7)
  if nan_at is not None:
    data[nan_at]['anchor'][0, 0, 0] = np.nan
  stacked = {r: np.stack([b[r] for b in data]) for r in step_lib.ROLES}
  return data, parallel.put_host_batches(stacked)


@pytest.mark.parametrize('name', ['single', 'pmap', 'jit'])
def test_loop_of_several_steps_equals_single_steps_without_recompiling(runs, initial_state, name):
  """One compiled call of 3 steps, then calls of 2 and 1 (no new compilation), against the single step."""
  run = runs[name]
  parallel = run['parallel']
  raw = step_lib.make_train_step(run['model'], SGD, LOSS, axis_name=parallel.axis_name, guard=False)
  loop = parallel.compile_train_loop(step_lib.make_train_loop(raw, host_batch_fn), data_sharded=True)
  data, placed = loop_inputs(parallel, 3)
  rng, lrs = parallel.put_replicated(jax.random.key(1)), parallel.put_replicated(np.ones(3, np.float32))
  put = parallel.put_replicated
  state, acc = loop(parallel.put_state(initial_state), put(step_lib.init_loop_metrics(LOSS, 8)), placed, lrs, rng,
                    put(np.int32(3)))
  reference = parallel.put_state(initial_state)
  for batch in data:
    reference, _ = run['step'](reference, parallel.put_batch(batch), jax.random.key(1), np.float32(1.0))
  got, want = parallel.get_state(state), parallel.get_state(reference)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  values = parallel.get_metrics(acc)
  assert values['count'] == 3 and values['first_bad_step'] == -1 and np.isfinite(values['sums']['loss'])
  with count_compilations() as compiled:
    for n in (2, 1):
      state, acc = loop(state, acc, placed, lrs, rng, put(np.int32(n)))
    assert parallel.get_metrics(acc)['count'] == 6
  assert compiled == []
  assert int(parallel.get_state(state).step) == 6


def test_first_non_finite_step_is_sticky_and_keeps_the_state_before_it(runs, initial_state):
  run = runs['jit']
  parallel = run['parallel']
  raw = step_lib.make_train_step(run['model'], SGD, LOSS, axis_name=None, guard=False)
  loop = parallel.compile_train_loop(step_lib.make_train_loop(raw, host_batch_fn), data_sharded=True)
  data, placed = loop_inputs(parallel, 3, nan_at=1)
  put = parallel.put_replicated
  state, acc = loop(parallel.put_state(initial_state), put(step_lib.init_loop_metrics(LOSS, 8)), placed,
                    put(np.ones(3, np.float32)), put(jax.random.key(1)), put(np.int32(3)))
  values = parallel.get_metrics(acc)
  assert values['first_bad_step'] == 1 and values['count'] == 1 and np.isnan(values['bad_loss'])
  # Step 2's batch was fine, but nothing after the bad step counts: the state is the one after step 0.
  reference, _ = run['step'](parallel.put_state(initial_state), parallel.put_batch(data[0]), jax.random.key(1),
                             np.float32(1.0))
  for a, b in zip(jax.tree.leaves(parallel.get_state(state)), jax.tree.leaves(parallel.get_state(reference))):
    np.testing.assert_allclose(a, b, rtol=1e-6)
