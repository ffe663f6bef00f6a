"""Every algorithm trains: one compiled step moves the parameters and keeps meters finite."""

import jax
import numpy as np
import pytest

from dale_jax import algorithms, configs, parallel, train


@pytest.mark.parametrize("name", sorted(algorithms.ALGORITHMS))
def test_every_algorithm_takes_a_finite_step(name):
  c = configs.base_config("mnist_digits", name)
  c.batch_size = 8
  if "steps" in c.sampler:
    c.sampler.steps = 1
  if c.draws > 1:
    c.draws = 2
  if name == "RandSmoothing":
    c.sampler.num_samples = 2
  configs.validate(c)
  mesh = parallel.make_mesh()
  state = train.create_train_state(c, jax.random.key(0), (28, 28, 1), 10)
  before = jax.tree.map(np.asarray, state.params)
  step = train.make_train_step(c, 10, mesh=mesh)
  rng = np.random.RandomState(0)
  batch = {"image": rng.uniform(size=(8, 28, 28, 1)).astype(np.float32),
           "label": rng.randint(0, 10, size=(8,)).astype(np.int32)}
  state, meters = step(state, parallel.shard_batch(batch, mesh))
  meters = jax.device_get(meters)
  assert "Loss" in meters and all(np.isfinite(v) for v in meters.values()), meters
  assert int(state.step) == 1
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(b) - a).max(), before, state.params)
  assert max(jax.tree.leaves(moved)) > 0
  if algorithms.ALGORITHMS[name].uses_dual:
    assert "dual variable" in meters and meters["dual variable"] >= 0


@pytest.mark.parametrize("name", ["PGD", "Gaussian_DALE_PD"])
def test_l1_ball_training_takes_a_finite_step(name):
  """PGD-L1 and DALE-L1: --config.sampler.norm=l1 with an L1 radius."""
  c = configs.base_config("mnist_digits", name)
  c.batch_size = 8
  c.sampler.update(norm="l1", eps=10.0, step_size=1.0, steps=2)
  c.eval.update(norm="l1", eps=10.0)
  configs.validate(c)
  mesh = parallel.make_mesh()
  state = train.create_train_state(c, jax.random.key(0), (28, 28, 1), 10)
  step = train.make_train_step(c, 10, mesh=mesh)
  rng = np.random.RandomState(0)
  batch = {"image": rng.uniform(size=(8, 28, 28, 1)).astype(np.float32),
           "label": rng.randint(0, 10, size=(8,)).astype(np.int32)}
  state, meters = step(state, parallel.shard_batch(batch, mesh))
  meters = jax.device_get(meters)
  assert all(np.isfinite(v) for v in meters.values()), meters
  assert meters["robust loss" if name == "Gaussian_DALE_PD" else "Loss"] > 0
