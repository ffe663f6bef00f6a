"""Dual ascent against a NumPy loop: nu <- max(0, nu + eta (mean_k c - rho)) every k calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dale_jax import dual


def _np_dual(constraints, step_size, margin, init_value, every):
  """The multiplier after each call, for a sequence of scalar constraint values."""
  nu, window, out = float(init_value), [], []
  for c in constraints:
    window.append(float(c))
    if len(window) == every:
      nu = max(0.0, nu + step_size * (np.mean(window) - margin))
      window = []
    out.append(nu)
  return np.array(out)


def _run(tx, constraints, like=0.0, jit=False):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(like)
  trace = []
  for c in constraints:
    state = update(jax.tree.map(jnp.float32, c), state)
    trace.append(state.nu)
  return state, trace


@pytest.mark.parametrize("every", [1, 3, 4])
@pytest.mark.parametrize("init_value", [0.0, 1.0])
def test_scalar_constraint_matches_numpy(every, init_value):
  rng = np.random.default_rng(every)
  # Constraint values on both sides of the margin, so nu rises, falls and hits 0.
  constraints = np.concatenate([rng.uniform(-2.5, -0.5, 12), rng.uniform(-1.0, 2.5, 12)])
  constraints = rng.permutation(constraints[:12]).tolist() + constraints[12:].tolist()
  constraints = np.float32(constraints)
  tx = dual.dual_ascent(0.5, 0.1, init_value=init_value, every=every)
  _, trace = _run(tx, constraints, jit=True)
  want = _np_dual(constraints, 0.5, 0.1, init_value, every)
  np.testing.assert_allclose(np.array(trace), want, rtol=1e-5, atol=1e-6)
  assert np.any(want == 0.0) and np.any(np.diff(want) > 0)  # both regimes are exercised


def test_every_k_averages_the_last_k_values_then_restarts():
  tx = dual.dual_ascent(1.0, 0.5, init_value=0.0, every=3)
  state, trace = _run(tx, [1.0, 2.0, 4.0, 10.0, 10.0])
  # Unchanged until the third call, then 0 + 1.0 * (7/3 - 0.5); the window restarts.
  np.testing.assert_allclose(np.array(trace), [0.0, 0.0, 7 / 3 - 0.5, 7 / 3 - 0.5, 7 / 3 - 0.5],
                             rtol=1e-6)
  assert int(state.count) == 2
  np.testing.assert_allclose(float(state.total), 20.0)


def test_several_constraints_with_their_own_margins():
  margin = {"clean": 0.1, "robust": {"pgd": 0.5, "cvar": 2.0}}
  tx = dual.dual_ascent(0.2, margin, init_value=1.0, every=2)
  rng = np.random.default_rng(0)
  seq = [{"clean": rng.uniform(0, 1), "robust": {"pgd": rng.uniform(0, 1),
                                                 "cvar": rng.uniform(0, 3)}}
         for _ in range(10)]
  like = jax.tree.map(lambda _: 0.0, seq[0])
  state, _ = _run(tx, seq, like=like, jit=True)
  flat_margin, treedef = jax.tree.flatten(margin)
  for leaf, (rho, got) in enumerate(zip(flat_margin, jax.tree.leaves(state.nu))):
    values = [jax.tree.leaves(c)[leaf] for c in seq]
    np.testing.assert_allclose(float(got), _np_dual(values, 0.2, rho, 1.0, 2)[-1], rtol=1e-5)
  assert jax.tree.structure(state.nu) == treedef


def test_scalar_margin_applies_to_every_constraint():
  tx = dual.dual_ascent(0.5, 0.2)
  state = tx.init({"a": 0.0, "b": 0.0})
  state = tx.update({"a": jnp.float32(1.0), "b": jnp.float32(0.0)}, state)
  np.testing.assert_allclose(float(state.nu["a"]), 1.0 + 0.5 * 0.8, rtol=1e-6)
  np.testing.assert_allclose(float(state.nu["b"]), 1.0 - 0.5 * 0.2, rtol=1e-6)


def test_a_single_constraint_in_a_container_with_its_own_margin():
  tx = dual.dual_ascent(0.5, {"clean": 0.2})
  state = tx.init({"clean": 0.0})
  state = tx.update({"clean": jnp.float32(1.0)}, state)
  np.testing.assert_allclose(float(state.nu["clean"]), 1.0 + 0.5 * 0.8, rtol=1e-6)


def test_vector_constraints_are_elementwise():
  tx = dual.dual_ascent(1.0, 0.0, init_value=0.5)
  state = tx.init(jnp.zeros(3))
  state = tx.update(jnp.array([1.0, -0.2, -3.0]), state)
  np.testing.assert_allclose(np.asarray(state.nu), [1.5, 0.3, 0.0], rtol=1e-6)


def test_nu_never_negative_and_step_zero_keeps_it():
  tx = dual.dual_ascent(10.0, 0.1, init_value=0.2)
  _, trace = _run(tx, [-5.0, -1.0, 0.0, 0.05], jit=True)
  assert all(float(n) == 0.0 for n in trace)
  frozen = dual.dual_ascent(0.0, 0.1, init_value=0.7)
  _, trace = _run(frozen, [5.0, -5.0])
  assert all(float(n) == np.float32(0.7) for n in trace)


def test_update_is_jittable_and_does_not_differentiate_through_nu():
  tx = dual.dual_ascent(0.1, 0.1)
  state = tx.init()
  g = jax.grad(lambda c: jnp.sum(tx.update(c, state).nu))(jnp.float32(3.0))
  assert float(g) == 0.0  # the constraint is a constant for the dual step
  lowered = jax.jit(tx.update).lower(jnp.float32(1.0), state)
  assert lowered.out_info.nu.shape == ()
  assert state.count.dtype == jnp.int32 and state.nu.dtype == jnp.float32


@pytest.mark.parametrize("kwargs,field", [
    (dict(step_size=-0.1, margin=0.1), "step_size"),
    (dict(step_size=float("nan"), margin=0.1), "step_size"),
    (dict(step_size=0.1, margin=0.1, init_value=-1.0), "init_value"),
    (dict(step_size=0.1, margin=0.1, every=0), "every"),
    (dict(step_size=0.1, margin=0.1, every=2.0), "every"),
    (dict(step_size=0.1, margin=0.1, every=True), "every"),
])
def test_bad_hyperparameters_raise_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"dual\.{field}\b"):
    dual.dual_ascent(**kwargs)


def test_numpy_scalar_hyperparameters_are_accepted():
  tx = dual.dual_ascent(np.float32(0.5), 0.1, init_value=np.float64(1.0), every=np.int64(2))
  state, trace = _run(tx, [1.0, 0.0])
  np.testing.assert_allclose(float(trace[-1]), 1.0 + 0.5 * (0.5 - 0.1), rtol=1e-6)
