"""Model FLOPs of a JAX function, counted on its jaxpr.

XLA's ``cost_analysis()`` counts the body of a loop once, whatever its trip
count, so it reports a 7-step sampler as one step. Counting on the jaxpr instead
multiplies ``scan`` bodies (``fori_loop`` with static bounds is a ``scan``) by
their length. Only matmuls and convolutions are counted (``2 m n k`` multiply-adds
each), the convention of "model FLOPs utilisation"; elementwise work is left out.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jcore


def _sub_jaxprs(eqn) -> list:
  found = []
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jcore.ClosedJaxpr):
        found.append(v.jaxpr)
      elif isinstance(v, jcore.Jaxpr):
        found.append(v)
  return found


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval.shape
  k = math.prod(lhs[d] for d in lhs_contract)
  return 2.0 * math.prod(out) * k


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval.shape
  # Each output element is a dot over (input features / groups) x window.
  in_features = rhs[dn.rhs_spec[1]]
  window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
  return 2.0 * math.prod(out) * in_features * window


def jaxpr_flops(jaxpr) -> float:
  """Matmul and convolution FLOPs of ``jaxpr``, loop bodies times their trip count."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "while":
      # Unknown trip count: the body is counted once (as XLA does).
      total += jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)
    elif name == "cond":
      total += max((jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
    else:
      total += sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
  return total


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
  """Matmul and convolution FLOPs of one call ``fn(*args, **kwargs)`` (traced, not run)."""
  return jaxpr_flops(jax.make_jaxpr(fn, **kwargs)(*args).jaxpr)
