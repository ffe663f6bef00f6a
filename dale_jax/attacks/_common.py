"""Parts shared by the attacks: per-example keys, the jit wrapper, argument checks."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dale_jax import threat
from dale_jax import validation

LogitsFn = Callable[[jax.Array], jax.Array]

# AutoAttack's standard budgets (Croce & Hein 2020; fra31/auto-attack's
# autoattack.py): written here once, read by the attacks' signatures, the registry,
# the configs' ``eval`` section, dale-eval's flags and the results pages.
APGD_STEPS = 100
FAB_STEPS = 100
SQUARE_QUERIES = 5000


def as_pytree_fn(logits_fn: LogitsFn) -> jax.tree_util.Partial:
  """Wraps ``logits_fn`` so that it can be passed to a jitted function.

  A ``jax.tree_util.Partial`` is passed through unchanged: its bound arguments
  (e.g. a model's variables in ``Partial(model.apply, variables)``) are then
  traced arguments, so new weights do not trigger a recompilation. Any other
  callable becomes static; what it closes over is baked into the program.
  """
  if isinstance(logits_fn, (jax.tree_util.Partial, Randomized)):
    return logits_fn
  if not callable(logits_fn):
    raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}")
  return jax.tree_util.Partial(logits_fn)


@jax.tree_util.register_pytree_node_class
class Randomized:
  """A randomised model ``fn(x, key) -> logits`` seen as ``x -> logits`` at one key.

  Calling it evaluates one fixed draw of the model's randomness, so every attack
  can use it as a deterministic ``logits_fn``; :meth:`redraw` gives independent
  draws (``fold_in(key, i)``), which APGD averages over for expectation over
  transformation (EOT). A pytree: ``fn`` (a ``jax.tree_util.Partial``) and
  ``key`` are traced arguments of a jitted attack.
  """

  def __init__(self, fn, key):
    if not isinstance(fn, jax.tree_util.Partial):
      if not callable(fn):
        raise TypeError(f"fn must be callable as fn(x, key), got {type(fn).__name__}")
      fn = jax.tree_util.Partial(fn)
    self.fn = fn
    self.key = key

  def __call__(self, x):
    return self.fn(x, self.key)

  def redraw(self, i) -> "Randomized":
    return self.tree_unflatten(None, (self.fn, jax.random.fold_in(self.key, i)))

  def tree_flatten(self):
    return (self.fn, self.key), None

  @classmethod
  def tree_unflatten(cls, _, children):
    obj = object.__new__(cls)  # children may be tracers or placeholders: no checks
    obj.fn, obj.key = children
    return obj


def attack_runs(run, x: jax.Array, acc: jax.Array, n_runs: int):
  """Runs ``run(j, acc) -> (candidate, still_correct)`` for ``j < n_runs`` on the points left.

  ``acc`` marks the points still to attack. After run ``j``, a point that was
  left and that the run broke (``~still_correct``) takes the run's candidate
  and leaves the set; later runs (restarts, target classes) attack the rest. A
  run is skipped when no point is left, which changes no result. Returns
  ``(x_adv, still_correct)`` with ``x_adv = x`` where no run succeeded.
  """

  def one_run(carry, j):
    adv, acc = carry

    def attack(_):
      candidate, correct = run(j, acc)
      broken = acc & ~correct
      return jnp.where(bcast(broken, x), candidate, adv), acc & correct

    return jax.lax.cond(jnp.any(acc), attack, lambda _: (adv, acc), None), None

  (adv, acc), _ = jax.lax.scan(one_run, (x, acc), jnp.arange(n_runs))
  return jax.lax.stop_gradient(adv), acc


def example_keys(key: jax.Array, n: int) -> jax.Array:
  """One typed key per example: ``fold_in(key, i)`` for ``i < n``.

  ``key`` may be a single key (typed or raw ``uint32[2]``) or already one key
  per example (shape ``(n,)`` typed, or ``(n, 2)`` raw). Deriving every random
  draw from a per-example key makes the result of an example independent of
  the batch it is evaluated in, of ``batch_size`` and of the device count.
  """
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.shape == ():
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n))
  if key.shape == (n,):
    return key
  raise validation.InvalidArgument(
      "key", rest=f"must be one key or one key per example ({n}), got shape {key.shape}")


def fold_keys(keys: jax.Array, data) -> jax.Array:
  """``fold_in(k, data)`` for every per-example key ``k``."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def per_example(draw: Callable[[jax.Array], jax.Array], keys: jax.Array) -> jax.Array:
  """Stacks ``draw(k)`` over the per-example keys."""
  return jax.vmap(draw)(keys)


def batch_shape(x: jax.Array) -> tuple[int, ...]:
  """Shape that broadcasts a per-example scalar against ``x``."""
  return (x.shape[0],) + (1,) * (x.ndim - 1)


def bcast(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape(batch_shape(x))


def predicted_correct(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1) == y


def check_inputs(x, y, norm: str, eps) -> None:
  """Raises before compiling when the inputs cannot describe an attack."""
  threat.check_threat(norm, eps)
  if getattr(x, "ndim", 0) < 2:
    raise validation.InvalidArgument(
        "x", rest=f"must have a batch axis, got shape {getattr(x, 'shape', None)}")
  if getattr(y, "shape", None) != (x.shape[0],):
    raise validation.InvalidArgument(
        "y", rest=f"must have shape ({x.shape[0]},), got {getattr(y, 'shape', None)}")


def check_positive_int(name: str, value) -> None:
  validation.integer(name, value, minimum=1)


def default_active(x: jax.Array, active) -> jax.Array:
  if active is None:
    return jnp.ones((x.shape[0],), bool)
  return jnp.asarray(active, bool)
