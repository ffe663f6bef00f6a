"""Argument checks shared by every module: one rule for what a number is.

Every factory and config check in dale_jax goes through these helpers, so the same
value is accepted or refused the same way everywhere: integers are any
``numbers.Integral`` (``int``, ``np.int64``) but not ``bool``; reals are any finite
``numbers.Real`` (``float``, ``np.float32``, an integer) but not ``bool``.

A refusal is an :class:`InvalidArgument`, a ``ValueError`` that keeps the field's
name apart from the message, so that a caller can say where the field lives:
``with prefixed("config.sampler"): make_sampler(...)`` turns
``step_size must be a finite number > 0, got -1`` into
``config.sampler.step_size must be ...``. No JAX import: the CLIs use this module
before JAX starts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from typing import Any, Collection, Iterator


class BadInput(Exception):
  """An error caused by what the user passed (a config field, a flag, a missing run or
  dataset), not by the code: the console scripts print it as one line and exit 2."""


class InvalidArgument(BadInput, ValueError):
  """``field`` must be ``accepted``, got ``value`` (or ``field`` + ``rest`` when given)."""

  def __init__(self, field: str, accepted: str = "", value: Any = None, *,
               rest: str | None = None):
    self.field, self.accepted, self.value = field, accepted, value
    if rest is None and not accepted:  # one whole message, as ``type(e)(str(e))`` passes it
      self.rest, message = "", field
    else:
      self.rest = rest if rest is not None else f"must be {accepted}, got {value!r}"
      message = f"{field} {self.rest}"
    super().__init__(message)


def is_integer(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  """A finite real number that is not a bool (a 0-d integer or float array counts)."""
  if not isinstance(value, numbers.Real):
    dtype = getattr(value, "dtype", None)
    if getattr(value, "shape", None) != () or getattr(dtype, "kind", None) not in ("i", "u", "f"):
      return False
  return not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, field: str, accepted: str, value: Any) -> None:
  """Raises :class:`InvalidArgument` unless ``ok``."""
  if not ok:
    raise InvalidArgument(field, accepted, value)


def _bounds(minimum, maximum, open_min: bool, open_max: bool) -> tuple[str, Any]:
  parts = []
  if minimum is not None:
    parts.append(("> " if open_min else ">= ") + f"{minimum:g}")
  if maximum is not None:
    parts.append(("< " if open_max else "<= ") + f"{maximum:g}")
  return " and ".join(parts)


def _in_range(value, minimum, maximum, open_min, open_max) -> bool:
  if minimum is not None and (value <= minimum if open_min else value < minimum):
    return False
  if maximum is not None and (value >= maximum if open_max else value > maximum):
    return False
  return True


def integer(field: str, value: Any, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
  """``value`` as an ``int`` if it is an integer in ``[minimum, maximum]``."""
  bounds = _bounds(minimum, maximum, False, False)
  ok = is_integer(value) and _in_range(value, minimum, maximum, False, False)
  require(ok, field, "an integer" + (f" {bounds}" if bounds else ""), value)
  return int(value)


def real(field: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
         open_min: bool = False, open_max: bool = False) -> float:
  """``value`` as a ``float`` if it is a finite real in the given (half-)open range."""
  bounds = _bounds(minimum, maximum, open_min, open_max)
  ok = is_real(value) and _in_range(value, minimum, maximum, open_min, open_max)
  require(ok, field, "a finite number" + (f" {bounds}" if bounds else ""), value)
  return float(value)


def positive(field: str, value: Any) -> float:
  return real(field, value, minimum=0, open_min=True)


def nonnegative(field: str, value: Any) -> float:
  return real(field, value, minimum=0)


def one_of(field: str, value: Any, choices: Collection[Any]) -> Any:
  """``value`` if it is one of ``choices`` (listed in the error)."""
  try:
    ok = value in choices
  except TypeError:  # an unhashable value against a set
    ok = False
  listed = list(choices) if isinstance(choices, (list, tuple)) else sorted(choices)
  require(ok and not isinstance(value, bool), field, f"one of {listed!r}", value)
  return value


def boolean(field: str, value: Any) -> bool:
  require(isinstance(value, bool), field, "True or False", value)
  return value


def string(field: str, value: Any, *, allow_none: bool = False) -> str | None:
  ok = isinstance(value, str) or (allow_none and value is None)
  require(ok, field, "a string" + (" or None" if allow_none else ""), value)
  return value


@contextlib.contextmanager
def prefixed(prefix: str) -> Iterator[None]:
  """Re-raises an :class:`InvalidArgument` from the block with ``prefix.`` before its field."""
  try:
    yield
  except InvalidArgument as e:
    inside = e.field == prefix or e.field.startswith(prefix + ".")
    field = e.field if inside else f"{prefix}.{e.field}"
    raise InvalidArgument(field, e.accepted, e.value, rest=e.rest) from None


# ----------------------------------------------------------------------------
# Units: what a radius or an epoch number means, not only its type.


def linf_radius(field: str, eps: Any) -> None:
  """Refuses an Linf radius above 1: images are in ``[0, 1]``, where a radius of 1
  already reaches every image, so a larger one is almost always pixel levels
  (``8`` for ``8/255``)."""
  if is_real(eps) and eps > 1:
    raise InvalidArgument(
        field, rest=f"is {eps:g}, an Linf radius on images in [0, 1], where 1 already "
        f"reaches every image: {eps:g} means {eps:g} pixel levels; did you mean "
        f"{eps:g}/255 = {eps / 255:.4f}?")


def linf_radii(config: Any) -> list[tuple[str, Any]]:
  """``(field, eps)`` of every Linf radius of a config: the sampler's and the
  evaluators' ``eps`` where their ``norm`` is ``linf``, and the ``linf_eps`` of the
  spatial perturbation sections. L2 and L1 radii have no such bound and are left out."""
  radii = []
  for name in ("sampler", "eval"):
    section = config.get(name) or {}
    if "eps" in section and section.get("norm") == "linf":
      radii.append((f"config.{name}.eps", section["eps"]))
  for name, section in (("perturbation", config.get("perturbation")),
                        ("eval.perturbation", (config.get("eval") or {}).get("perturbation"))):
    if section and "linf_eps" in section:
      radii.append((f"config.{name}.linf_eps", section["linf_eps"]))
  return radii


def check_linf_radii(config: Any) -> None:
  """:func:`linf_radius` for every Linf radius of ``config`` (:func:`linf_radii`)."""
  for field, eps in linf_radii(config):
    linf_radius(field, eps)


def schedule_past_end(boundaries: Any, num_epochs: Any) -> str | None:
  """The warning for schedule boundaries that training never reaches, else ``None``.

  A boundary ``b`` scales the learning rate from epoch ``b`` on (epochs count from
  0), so with ``num_epochs`` epochs a ``b >= num_epochs`` never takes effect. That is
  legitimate for a short run of a long schedule, hence a warning and not an error."""
  if not (isinstance(boundaries, (tuple, list)) and is_integer(num_epochs)):
    return None
  late = [b for b in boundaries if is_integer(b) and b >= num_epochs]
  if not late:
    return None
  return (f"config.schedule.boundaries {tuple(late)} >= config.num_epochs={num_epochs}: "
          "that learning-rate decay never happens in this run")


def warn_schedule(config: Any) -> None:
  """Logs :func:`schedule_past_end` of ``config`` as one warning line, if any."""
  message = schedule_past_end((config.get("schedule") or {}).get("boundaries"),
                              config.get("num_epochs"))
  if message:
    logging.getLogger("dale_jax").warning(message)
