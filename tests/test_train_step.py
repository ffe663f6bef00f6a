"""Every algorithm trains: one compiled step moves the parameters and keeps meters finite.

In float32 and in bfloat16 (``config.model.dtype``), every algorithm: the compute is
bfloat16, but everything the step carries from one step to the next (parameters,
optimizer state, the dual variable, BatchNorm statistics) stays float32. Each step
compiles a whole training program, so these are in the slow tier (the full suite and CI
run them; ``-m "not slow"`` leaves them out).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dale_jax import algorithms, configs, experiment, parallel
from dale_jax import steps as steps_lib


def _one_step(c, input_shape=(28, 28, 1)):
  """``(params before, state after, meters)`` of one compiled step on a random batch."""
  experiment.check(c)
  mesh = parallel.make_mesh()
  exp = experiment.build(c, num_classes=10)
  state = experiment.init_state(exp, jax.random.key(0), input_shape)
  before = jax.tree.map(np.asarray, state.params)
  step = steps_lib.make_train_step(exp, mesh=mesh)
  rng = np.random.RandomState(0)
  batch = {"image": rng.uniform(size=(c.batch_size, *input_shape)).astype(np.float32),
           "label": rng.randint(0, 10, size=(c.batch_size,)).astype(np.int32)}
  state, meters = step(state, parallel.shard_batch(batch, mesh))
  return before, state, jax.device_get(meters)


def _float_dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


_STEP_CASES = ([(n, "float32") for n in sorted(algorithms.ALGORITHMS)]
               + [pytest.param(n, "bfloat16", marks=pytest.mark.slow)
                  for n in sorted(algorithms.ALGORITHMS)])


@pytest.mark.slow
@pytest.mark.parametrize("name,dtype", _STEP_CASES)
def test_every_algorithm_takes_a_finite_step(name, dtype):
  c = configs.base_config("mnist_digits", name)
  c.batch_size = 8
  c.model.dtype = dtype
  if "steps" in c.sampler:
    c.sampler.steps = 1
  if c.draws > 1:
    c.draws = 2
  if name == "RandSmoothing":
    c.sampler.num_samples = 2
  before, state, meters = _one_step(c)
  assert "Loss" in meters and all(np.isfinite(v) for v in meters.values()), meters
  assert int(state.step) == 1
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(b) - a).max(), before, state.params)
  assert max(jax.tree.leaves(moved)) > 0
  if algorithms.ALGORITHMS[name].uses_dual:
    assert "dual variable" in meters and meters["dual variable"] >= 0
  assert _float_dtypes((state.params, state.opt_state, state.dual_state)) == {"float32"}


@pytest.mark.slow
def test_bfloat16_batchnorm_model_keeps_float32_state(monkeypatch):
  """ResNet-18 (BatchNorm) in bfloat16: statistics, parameters and momentum stay float32."""
  # The config's ResNet-18, cut to two stages of one block at width 4 to compile fast.
  create_model = experiment.create_model
  monkeypatch.setattr(experiment, "create_model", lambda *a, **k: create_model(*a, **k).clone(
      width=4, stage_sizes=(1, 1)))
  c = configs.base_config("cifar10", "ERM")
  c.batch_size = 4
  c.model.dtype = "bfloat16"
  before, state, meters = _one_step(c, (32, 32, 3))
  assert all(np.isfinite(v) for v in meters.values()), meters
  assert jax.tree.leaves(state.batch_stats)
  assert _float_dtypes((state.params, state.batch_stats, state.opt_state,
                        state.dual_state)) == {"float32"}
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(b) - a).max(), before, state.params)
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name,perturbation", [("Gaussian_DALE_PD", "se2"),
                                               ("MH_DALE_PD", "rotation")])
def test_training_over_a_geometric_set_takes_a_finite_step(name, perturbation):
  """--config.perturbation.name=se2: the sampler runs over the warp's parameters."""
  c = configs.base_config("mnist_digits", name)
  c.batch_size = 8
  c.sampler.steps = 2
  c.perturbation.update(name=perturbation, linf_eps=0.1 if perturbation == "se2" else 0.0)
  before, state, meters = _one_step(c)
  assert all(np.isfinite(v) for v in meters.values()), meters
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(b) - a).max(), before, state.params)
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["PGD", "Gaussian_DALE_PD"])
def test_l1_ball_training_takes_a_finite_step(name):
  """PGD-L1 and DALE-L1: --config.sampler.norm=l1 with an L1 radius."""
  c = configs.base_config("mnist_digits", name)
  c.batch_size = 8
  c.sampler.update(norm="l1", eps=10.0, step_size=1.0, steps=2)
  c.eval.update(norm="l1", eps=10.0)
  _, _, meters = _one_step(c)
  assert all(np.isfinite(v) for v in meters.values()), meters
  assert meters["robust loss" if name == "Gaussian_DALE_PD" else "Loss"] > 0
