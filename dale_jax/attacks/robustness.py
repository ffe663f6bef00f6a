"""Robustness of a model on a data set: FGSM, PGD-20 and the AutoAttack chain, with warnings.

:func:`evaluate_robustness` is the host driver behind ``dale-eval``: it shards batches
over the ``data`` mesh axis (across processes and hosts under ``jax.distributed``),
runs the reference attacks on every correctly classified point and the chain attacks
on the points still robust, and flags the patterns of
gradient masking that AutoAttack's authors list (a weaker attack beating a stronger
one, the black-box Square attack breaking points every white-box attack missed,
probabilities passed as logits, all-zero input gradients). With a progress directory
it keeps every finished batch (:mod:`dale_jax.attacks.progress`), so a killed
evaluation resumes; :func:`robustbench_model_info` writes the result in RobustBench's
shape.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dale_jax import data
from dale_jax import parallel
from dale_jax import perturbations
from dale_jax import validation
from dale_jax.attacks import _common
from dale_jax.attacks import chain as chain_lib
from dale_jax.attacks import progress as progress_lib
from dale_jax.attacks import registry

DEFAULT_ATTACKS = ("clean", "pgd20", "apgd-ce", "apgd-t", "fab-t", "square")
_WHITE_BOX = ("fgsm", "pgd20", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t")
# (weaker, stronger) pairs: the stronger attack should never do clearly worse.
_STRENGTH_ORDER = (("fgsm", "pgd20"), ("pgd20", "apgd-ce"), ("fgsm", "apgd-ce"))
# AutoAttack flags Square when it breaks more than this share of points.
_SQUARE_ALPHA = 0.2


@functools.partial(jax.jit, static_argnames=("name", "settings", "norm"))
def _attack_batch(fn, x, y, attack_key, indices, active, eps, *, name, settings, norm):
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(attack_key, indices)
  return registry.run(name, settings, fn, x, y, keys, active, eps, norm=norm)


@jax.jit
def _clean_batch(fn, x, y):
  """Correct predictions, whether the logits look like probabilities, zero input gradients."""
  def loss(xa):
    logits = fn(xa)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)), logits

  grad, logits = jax.grad(loss, has_aux=True)(x)
  zero_grad = jnp.all(grad.reshape(grad.shape[0], -1) == 0, axis=-1)
  probs_like = ((jnp.max(logits) < 1 + 1e-5) & (jnp.min(logits) > -1e-5)
                & jnp.all(jnp.abs(jnp.sum(logits, -1) - 1) < 1e-5))
  return _common.predicted_correct(logits, y), zero_grad, probs_like


def _batches(indices: np.ndarray, batch_size: int, mesh):
  """``(chunk, padded, mask)`` over ``indices`` in batches of at most ``batch_size`` rows.

  The rows are split evenly over the fewest batches (each padded to a multiple of
  the device count), so that a chain attack on the few points still robust does
  not compute ``batch_size`` rows: 29 points with ``batch_size=40`` make one batch
  of 29 rows (on one device), not 40. Padding rows repeat index 0 and are masked.
  """
  n = len(indices)
  if n == 0:
    return
  n_batches = -(-n // batch_size)
  rows = -(-n // n_batches)
  pad_to = parallel.padded_batch_size(rows, mesh)
  for padded, _, mask in data.eval_batches(indices, indices, rows, pad_to=pad_to):
    yield padded[mask], padded, mask


def evaluate_robustness(
    logits_fn,
    x,
    y,
    *,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    norm: str,
    eps: float,
    batch_size: int = 256,
    seed: int = 0,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    version: str | None = None,
    individual: bool = False,
    randomized: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    warning_margin: float = 0.5,
    progress_dir: str | None = None,
    keep_adversarial: bool = False,
    log=None,
) -> dict[str, Any]:
  """Accuracy under attack of ``logits_fn`` on ``(x, y)``, all accuracies in percent.

  ``"clean"``, ``"fgsm"`` and ``"pgd20"`` are measured on their own. The
  chain attacks (``"apgd-ce"``, ``"apgd-dlr"``, ``"apgd-t"``, ``"fab"``,
  ``"fab-t"``, ``"square"``) run in the given order, each only on the points
  that the chain has not broken yet, and ``per_attack`` then holds the robust
  accuracy after each of them (as AutoAttack reports it); with
  ``individual=True`` each runs on all correctly classified points and
  ``per_attack`` holds its own accuracy. ``robust_accuracy`` is the share of
  points that no attack broke.

  Args:
    logits_fn: ``x -> logits``, the model in eval mode. Passing
      ``jax.tree_util.Partial(model.apply, variables)`` keeps the weights out
      of the compiled program. With ``randomized``, ``(x, key) -> logits``.
    x: NHWC images in ``[0, 1]`` (NumPy or JAX); y: integer labels.
    attacks: names among :data:`dale_jax.attacks.ATTACKS`. With ``version``,
      only the reference attacks (``"clean"``, ``"fgsm"``, ``"pgd20"``).
    norm, eps: the threat model.
    batch_size: most points per attack call (bounds memory), rounded up to a
      multiple of the device count; an attack's points are split evenly over
      the fewest such batches.
    seed: seed of every random draw.
    settings: per-attack overrides of :func:`dale_jax.attacks.default_settings`
      (or of the version's settings), e.g. ``{"square": {"n_queries": 1000}}``.
    version: AutoAttack's chain by name (``"standard"``, ``"plus"`` or
      ``"rand"``, :func:`dale_jax.attacks.chain.version`), run after ``attacks``.
    individual: run each chain attack on every correct point.
    randomized: ``logits_fn`` is a randomised defence that draws its
      randomness from a key. Every batch of every attack gets its own key
      (from the seed), APGD draws afresh at every query and averages its
      gradient over ``eot_iter`` draws (``version="rand"``: 20); a point's
      draws then depend on its batch, unlike the attacks' own draws.
    mesh: a mesh with a ``"data"`` axis to shard batches over; by default
      :func:`dale_jax.parallel.make_mesh` (all devices, of every process).
      Under ``jax.distributed`` every process calls this function with the same
      arguments, feeds its own rows of each batch and returns the same result.
    warning_margin: accuracy gap (points) that triggers an ordering warning.
    progress_dir: keep the finished batches of every attack here
      (:mod:`dale_jax.attacks.progress`); a rerun with the same model, data
      and settings loads them and attacks only the rest, ending with the same
      numbers as an uninterrupted run. With several processes only process 0
      reads and writes it and tells the others which batches are done.
    keep_adversarial: also return ``x_adv`` (the first adversarial example
      found for each point, ``x`` where none was) and ``broken_by`` (the name
      of the attack that broke each point, ``""`` for robust points and
      ``"clean"`` for misclassified ones) as NumPy arrays.
    log: optional ``str -> None`` for progress lines.

  Returns:
    A dict with ``clean_accuracy``, ``robust_accuracy``, ``per_attack``
    (name -> accuracy), ``per_attack_kind`` (name -> ``"individual"`` or
    ``"cumulative"``), ``ensemble`` (its label), ``eps``, ``norm``,
    ``n_examples``, ``attack_settings``, ``zero_gradient_share``,
    ``attack_seconds`` (wall time of each attack, compilation included; summed
    over the runs that computed its batches) and ``warnings`` (sanity flags of
    gradient masking).
  """
  attacks = tuple(attacks)
  if version is not None:
    for name in attacks:
      if name in chain_lib.ENSEMBLE:
        raise validation.InvalidArgument(
            "attacks", f"only {', '.join(('clean',) + chain_lib.REFERENCE)} with "
            f"version={version!r} (the chain is the version's)", name)
    chain_lib.version(version, norm, eps)  # raises on an unknown version
  for name in attacks:
    if name not in registry.REGISTRY:
      raise validation.InvalidArgument("attacks", f"names among {', '.join(registry.ATTACKS)}",
                                       name)
  validation.require(len(set(attacks)) == len(attacks), "attacks", "distinct names", attacks)
  _common.check_inputs(x, y, norm, eps)
  _common.check_positive_int("batch_size", batch_size)
  x = np.asarray(x, np.float32)
  if randomized:
    fn = jax.tree_util.Partial(logits_fn) if not isinstance(
        logits_fn, jax.tree_util.Partial) else logits_fn
    probe = lambda xs: fn(xs, jax.random.key(0))  # pylint: disable=unnecessary-lambda-assignment
  else:
    fn = _common.as_pytree_fn(logits_fn)
    probe = fn
  n_classes = int(jax.eval_shape(
      probe, jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)).shape[-1])
  if version is not None:
    chain_names, resolved, _ = chain_lib.version(version, norm, eps, n_classes)
    resolved.update(registry.resolve_settings(attacks, eps, None))
    attacks = attacks + chain_names
    for name, changes in dict(settings or {}).items():
      if name not in attacks:
        raise validation.InvalidArgument(
            "settings", f"attacks that run ({', '.join(attacks)})", name)
      resolved.update(registry.resolve_settings((name,), eps, {name: {
          **resolved[name], **changes}}))
  else:
    resolved = registry.resolve_settings(attacks, eps, settings)
  if "square" in attacks and x.ndim != 4:
    raise validation.InvalidArgument("x", "NHWC images for square", f"shape {x.shape}")

  y = np.asarray(y, np.int32)
  n = x.shape[0]
  validation.require(n > 0, "x", "at least one example", f"shape {x.shape}")
  mesh = mesh or parallel.make_mesh()
  # Weights bound in a Partial are traced arguments: replicate them over the mesh.
  fn = parallel.replicate(fn, mesh)
  batch_size = parallel.padded_batch_size(min(batch_size, n), mesh)
  seed_key = jax.random.key(seed)
  model_key = jax.random.fold_in(seed_key, 1 << 20)

  def model_at(k: int, start: int):
    """The model for batch ``start`` of pass ``k`` (0: clean); a fixed draw when randomised."""
    if not randomized:
      return fn
    return _common.Randomized(fn, jax.random.fold_in(jax.random.fold_in(model_key, k), start))

  several = jax.process_count() > 1
  put = functools.partial(_put, mesh)

  for name in ("apgd-t", "fab-t"):
    if name in resolved:
      resolved[name]["n_target_classes"] = min(resolved[name]["n_target_classes"], n_classes - 1)

  progress = None
  # Only process 0 keeps the progress (it alone writes); the others follow its records.
  if progress_dir is not None and parallel.is_main_process():
    description = dict(
        attacks=attacks, settings=resolved, eps=float(eps), norm=norm, seed=int(seed),
        batch_size=batch_size, devices=mesh.size, individual=bool(individual),
        randomized=bool(randomized), n_examples=int(n))
    key = progress_lib.fingerprint({"x": x, "y": y, "weights": fn}, description)
    progress = progress_lib.Progress(progress_dir, key, description)
    done = progress.n_done()
    if done and log:
      log(f"resuming from {progress.dir}: {done} attack batches already done")

  # Clean pass.
  correct = np.zeros(n, bool)
  zero_grad = np.zeros(n, bool)
  probs_like = False
  for chunk, padded, _ in _batches(np.arange(n), batch_size, mesh):
    c, z, p = parallel.to_host(
        _clean_batch(model_at(0, int(chunk[0])), *put(x[padded], y[padded])))
    correct[chunk] = c[:len(chunk)]
    zero_grad[chunk] = z[:len(chunk)]
    probs_like |= bool(p)

  seconds: dict[str, float] = {}
  broken: dict[str, np.ndarray] = {}
  per_attack: dict[str, float] = {}
  kind: dict[str, str] = {}
  x_adv = x.copy() if keep_adversarial else None
  broken_by = np.where(correct, "", "clean").astype(object) if keep_adversarial else None
  chain = correct.copy()
  chain_started = False
  for k, name in enumerate(attacks):
    if name == "clean":
      per_attack[name] = _percent(correct)
      kind[name] = "individual"
      continue
    in_chain = name in chain_lib.ENSEMBLE
    active = chain if in_chain and not individual else correct
    kind[name] = "cumulative" if in_chain and not individual and chain_started else "individual"
    still = np.zeros(n, bool)
    attack_key = registry.attack_key(seed_key, name)
    frozen = registry.freeze(resolved[name])
    seconds[name] = 0.0
    for b, (chunk, padded, mask) in enumerate(_batches(np.nonzero(active)[0], batch_size, mesh)):
      record = progress.load(k, name, b) if progress else None
      if record is not None and not np.array_equal(record.indices, chunk):
        record = None
      if several and progress_dir is not None:
        record = _record_of_main(record, chunk, x if keep_adversarial else None)
      if record is None:
        started = time.perf_counter()
        adv, out = parallel.to_host(_attack_batch(
            model_at(k + 1, int(chunk[0])), *put(x[padded], y[padded]), attack_key,
            *put(padded, mask), eps, name=name, settings=frozen, norm=norm))
        out = out[:len(chunk)]
        record = progress_lib.BatchRecord(
            chunk, out, adv[:len(chunk)][~out], time.perf_counter() - started)
        if progress:
          progress.save(k, name, b, record)
      still[chunk] = record.still_correct
      seconds[name] += record.seconds
      if keep_adversarial:
        first = record.indices[~record.still_correct]
        new = broken_by[first] == ""
        x_adv[first[new]] = record.adv[new]
        broken_by[first[new]] = name
    seconds[name] = round(seconds[name], 3)
    broken[name] = active & ~still
    if in_chain:
      chain &= ~broken[name]
      chain_started = True
    per_attack[name] = _percent(chain) if kind[name] == "cumulative" else _percent(
        correct & ~broken[name])

  any_broken = np.zeros(n, bool)
  for b in broken.values():
    any_broken |= b
  robust = correct & ~any_broken
  ensemble_names = tuple(a for a in attacks if a in chain_lib.ENSEMBLE)
  result = {
      "clean_accuracy": _percent(correct),
      "robust_accuracy": _percent(robust),
      "per_attack": per_attack,
      "per_attack_kind": kind,
      "ensemble": chain_lib.ensemble_label(ensemble_names, resolved, eps, n_classes, norm),
      "ensemble_accuracy": _percent(chain) if ensemble_names else None,
      "eps": float(eps),
      "norm": norm,
      "n_examples": int(n),
      "seed": int(seed),
      "randomized": bool(randomized),
      "attack_settings": {k: v for k, v in resolved.items() if v},
      "zero_gradient_share": _percent(zero_grad & correct),
      "attack_seconds": seconds,
  }
  result["warnings"] = _sanity_warnings(result, broken, correct, probs_like, warning_margin)
  if randomized and version != "rand":
    result["warnings"].append(
        "the model is randomised: each attack saw one fixed draw per batch; AutoAttack's "
        "evaluation of randomised defences is version='rand' (EOT over 20 draws)")
  if version == "rand" and not randomized:
    result["warnings"].append(
        "version 'rand' on a deterministic model: EOT averages identical gradients, so this "
        "is APGD-CE and APGD-DLR; 'standard' is the evaluation of a deterministic model")
  if keep_adversarial:
    result["x_adv"] = x_adv
    result["broken_by"] = broken_by.astype(str)
  return result


def _record_of_main(record: progress_lib.BatchRecord | None, chunk: np.ndarray,
                    x: np.ndarray | None) -> progress_lib.BatchRecord | None:
  """Process 0's stored record of a batch (``None``: none), on every process.

  Only process 0 keeps progress, so that a resumed run does not depend on a file
  system shared by the hosts; every process must attack the same batches (the
  attack's all-reduces span them all) and learn the same points broken. The
  adversarial examples come along when ``x`` (the images, for their shape) is given.
  """
  if not parallel.from_main(np.int32(record is not None)):
    return None
  n = len(chunk)
  still = np.zeros(n, np.int32) if record is None else record.still_correct.astype(np.int32)
  seconds = np.float32(0 if record is None else record.seconds)
  if x is None:
    still, seconds = parallel.from_main((still, seconds))
    return progress_lib.BatchRecord(chunk, still.astype(bool), np.zeros((0,)), float(seconds))
  adv = np.zeros((n,) + x.shape[1:], x.dtype)
  if record is not None:
    adv[~record.still_correct] = record.adv
  still, adv, seconds = parallel.from_main((still, adv, seconds))
  still = still.astype(bool)
  return progress_lib.BatchRecord(chunk, still, adv[~still], float(seconds))


# The spatial attacks of dale-eval, as the training evaluators Grid and Worst-of-K.
SPATIAL = ("grid", "worst_of_k")
# Images per device in one forward pass that an automatic grid_chunk aims at.
SPATIAL_ROWS = 1024


@jax.jit
def _predict_batch(fn, x, y):
  return _common.predicted_correct(fn(x), y)


@functools.partial(jax.jit, static_argnames=("pset", "search", "k", "chunk"))
def _spatial_batch(fn, x, y, key, indices, grid, *, pset, search, k, chunk):
  """Whether each example is classified right under every candidate of ``search``."""
  if search == "grid":
    candidates = jnp.broadcast_to(grid[:, None, :], (grid.shape[0],) + (x.shape[0],)
                                  + grid.shape[1:])
  else:  # k draws per example, from its index: independent of the batch and the layout
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)

    def draws(j):
      def one(example_key, image):
        delta = pset.uniform(jax.random.fold_in(example_key, j), image[None])
        return jax.tree.map(lambda d: d[0], delta)
      return jax.vmap(one)(keys, x)

    candidates = jax.vmap(draws)(jnp.arange(k))
  return perturbations.search(fn, pset, x, y, candidates, chunk)[0]


def check_spatial(perturbation: Mapping[str, Any], searches: Sequence[str],
                  grid_points: int | Sequence[int], worst_of_k: int, grid_chunk: int = 0):
  """``(settings, pset)``: the spatial threat model of :func:`evaluate_spatial`,
  checked without starting JAX's backend (so before ``jax.distributed`` starts);
  ``settings`` is ``perturbation`` with the defaults of
  :func:`dale_jax.perturbations.make_perturbation` filled in (``name``: ``se2``).

  Raises:
    dale_jax.validation.InvalidArgument: naming the field.
  """
  for name in searches:
    validation.one_of("spatial", name, SPATIAL)
  validation.require(len(set(searches)) == len(searches), "spatial", "names without repeats",
                     tuple(searches))
  validation.integer("grid_chunk", grid_chunk, minimum=0)
  validation.integer("worst_of_k", worst_of_k, minimum=1)
  settings = {"name": "se2", "angle": 30.0, "shift": (3.0, 3.0), "padding": "zeros",
              "linf_eps": 0.0, **dict(perturbation)}
  if isinstance(settings["shift"], (tuple, list)):
    settings["shift"] = tuple(settings["shift"])
  pset = perturbations.make_perturbation(settings)
  if "grid" in searches and pset is not None and settings["linf_eps"]:
    raise validation.InvalidArgument(
        "perturbation.linf_eps", rest="must be 0 for the grid: an Linf ball after the warp "
        f"has no finite grid (worst_of_k searches it), got {settings['linf_eps']!r}")
  if pset is None:
    raise validation.InvalidArgument("perturbation.name", "a geometric set ("
                                      f"{', '.join(perturbations.NAMES[1:])})", settings["name"])
  if "grid" in searches:
    perturbations.grid_counts(grid_points, len(pset.axes))
  return settings, pset


def spatial_chunk(grid_chunk: int, candidates: int, rows_per_device: int) -> int:
  """Candidates per forward pass: ``grid_chunk``, or with 0 as many as keep a pass
  within :data:`SPATIAL_ROWS` images per device; at most ``candidates``."""
  if grid_chunk:
    return min(grid_chunk, candidates)
  return max(1, min(candidates, SPATIAL_ROWS // max(rows_per_device, 1)))


def evaluate_spatial(
    logits_fn,
    x,
    y,
    *,
    perturbation: Mapping[str, Any],
    searches: Sequence[str] = SPATIAL,
    grid_points: int | Sequence[int] = 5,
    worst_of_k: int = 10,
    batch_size: int = 256,
    grid_chunk: int = 0,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    progress_dir: str | None = None,
    log=None,
) -> dict[str, Any]:
  """Accuracy of ``logits_fn`` on ``(x, y)`` under spatial attacks, in percent.

  The two searches of the training evaluators ``Grid`` and ``Worst-of-K`` over a
  geometric perturbation set (:func:`dale_jax.perturbations.make_perturbation`:
  rotations, translations or SE(2), optionally followed by an Linf ball):

  * ``"grid"``: every combination of ``grid_points`` values per parameter, ends
    included (Engstrom et al. 2019);
  * ``"worst_of_k"``: ``worst_of_k`` uniform draws per example, each drawn from
    the seed and the example's index, so that batches and devices do not change
    them.

  A point counts as robust when it is classified right clean and under every
  candidate (:func:`dale_jax.perturbations.search`); each search runs on the
  points classified right. The grid is tried ``grid_chunk`` points per forward
  pass (0: :func:`spatial_chunk`). Batching, several processes and the progress
  directory work as in :func:`evaluate_robustness`.

  Args:
    logits_fn: ``x -> logits``, the model in eval mode.
    x: NHWC images in ``[0, 1]``; y: integer labels.
    perturbation: a ``perturbation`` config section (``name``, ``angle``,
      ``shift``, ``padding``, ``linf_eps``); ``name`` a geometric set.
    searches: names among :data:`SPATIAL`.
    grid_points: per axis (one count for all axes, or one per axis).
    worst_of_k: draws per example.
    batch_size, seed, mesh, progress_dir, log: as in :func:`evaluate_robustness`.

  Returns:
    ``{"perturbation": the set's parameters (defaults filled in), "n_examples",
    "clean_accuracy", "seed", "per_attack": {search: accuracy}, "candidates":
    {search: candidates per point}, "grid_points", "worst_of_k", "grid_chunk",
    "attack_seconds"}``.

  Raises:
    dale_jax.validation.InvalidArgument: before anything is compiled, for an
      unknown search, a set that is not geometric or a bad count.
  """
  searches = tuple(searches)
  _common.check_positive_int("batch_size", batch_size)
  settings, pset = check_spatial(perturbation, searches, grid_points, worst_of_k, grid_chunk)
  grid = np.asarray(pset.grid(grid_points)) if "grid" in searches else None
  counts = None if grid is None else perturbations.grid_counts(grid_points, len(pset.axes))
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  n = x.shape[0]
  validation.require(n > 0, "x", "at least one example", f"shape {x.shape}")
  validation.require(x.ndim == 4, "x", "NHWC images for the spatial attacks", f"shape {x.shape}")

  mesh = mesh or parallel.make_mesh()
  fn = parallel.replicate(_common.as_pytree_fn(logits_fn), mesh)
  grid_on_mesh = None if grid is None else parallel.replicate(grid, mesh)
  batch_size = parallel.padded_batch_size(min(batch_size, n), mesh)
  candidates = {"grid": 0 if grid is None else len(grid), "worst_of_k": int(worst_of_k)}
  chunk = spatial_chunk(grid_chunk, candidates["grid"] or 1, batch_size // mesh.size)
  seed_key = jax.random.key(seed)

  progress = None
  if progress_dir is not None and parallel.is_main_process():
    description = dict(
        spatial=searches, perturbation=settings, grid_points=counts, worst_of_k=int(worst_of_k),
        grid_chunk=chunk, seed=int(seed), batch_size=batch_size, devices=mesh.size,
        n_examples=int(n))
    key = progress_lib.fingerprint({"x": x, "y": y, "weights": fn}, description)
    progress = progress_lib.Progress(progress_dir, key, description)
    if progress.n_done() and log:
      log(f"resuming from {progress.dir}: {progress.n_done()} spatial batches already done")

  correct = np.zeros(n, bool)
  for chunk_rows, padded, _ in _batches(np.arange(n), batch_size, mesh):
    c = parallel.to_host(_predict_batch(fn, *_put(mesh, x[padded], y[padded])))
    correct[chunk_rows] = c[:len(chunk_rows)]

  per_attack, seconds = {}, {}
  for k, name in enumerate(searches):
    still = np.zeros(n, bool)
    search_key = jax.random.fold_in(seed_key, (1 << 21) + SPATIAL.index(name))
    seconds[name] = 0.0
    for b, (rows, padded, _) in enumerate(_batches(np.nonzero(correct)[0], batch_size, mesh)):
      record = progress.load(k, name, b) if progress else None
      if record is not None and not np.array_equal(record.indices, rows):
        record = None
      if jax.process_count() > 1 and progress_dir is not None:
        record = _record_of_main(record, rows, None)
      if record is None:
        started = time.perf_counter()
        right = parallel.to_host(_spatial_batch(
            fn, *_put(mesh, x[padded], y[padded]), search_key, *_put(mesh, padded),
            grid_on_mesh if name == "grid" else None, pset=pset, search=name,
            k=int(worst_of_k), chunk=chunk if name == "grid" else 1))
        record = progress_lib.BatchRecord(rows, right[:len(rows)], np.zeros((0,)),
                                          time.perf_counter() - started)
        if progress:
          progress.save(k, name, b, record)
      still[rows] = record.still_correct
      seconds[name] += record.seconds
    seconds[name] = round(seconds[name], 3)
    per_attack[name] = _percent(correct & still)
  return {
      "perturbation": {**settings, "shift": list(settings["shift"])},
      "n_examples": int(n),
      "clean_accuracy": _percent(correct),
      "seed": int(seed),
      "per_attack": per_attack,
      "candidates": {name: candidates[name] for name in searches},
      "grid_points": list(counts) if counts else None,
      "worst_of_k": int(worst_of_k) if "worst_of_k" in searches else None,
      "grid_chunk": chunk if "grid" in searches else None,
      "attack_seconds": seconds,
  }


def _put(mesh, *arrays):
  """The batch on the mesh; with several processes each places its own rows."""
  rows = parallel.process_rows(len(arrays[0]))
  return parallel.shard_batch(tuple(np.asarray(a)[rows] for a in arrays), mesh)


_THREAT_MODELS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def robustbench_model_info(result: Mapping[str, Any], *, dataset: str, architecture: str,
                           name: str | None = None) -> dict[str, Any]:
  """The report in RobustBench's model-info shape (``model_info/<dataset>/<threat>/<name>.json``).

  ``clean_acc`` and ``autoattack_acc`` are percentages written with two decimals,
  as RobustBench's own ``update_json`` writes them; ``autoattack_acc`` is set only
  when the chain that ran is exactly "AutoAttack (standard)", the one evaluation
  RobustBench accepts (otherwise ``None``, and ``footnote`` says what ran). The
  fields RobustBench leaves to the author (link, authors, venue, reported) are
  ``None``; ``threat_model``, ``n_examples``, ``autoattack_version`` and
  ``seed`` are added.
  """
  label = result.get("ensemble")
  standard = label == chain_lib.AUTOATTACK_LABEL
  footnote = None
  if not standard:
    footnote = f"not AutoAttack (standard): {label}" if label else "no AutoAttack chain ran"
  return {
      "link": None, "name": name, "authors": None, "additional_data": False,
      "number_forward_passes": 1, "dataset": dataset, "venue": None,
      "architecture": architecture, "eps": result["eps"],
      "clean_acc": f"{result['clean_accuracy']:.2f}", "reported": None,
      "autoattack_acc": f"{result['ensemble_accuracy']:.2f}" if standard else None,
      "footnote": footnote, "threat_model": _THREAT_MODELS[result["norm"]],
      "n_examples": result["n_examples"],
      "autoattack_version": label[len("AutoAttack ("):-1] if label and label.startswith(
          "AutoAttack (") and label.endswith(")") else None,
      "seed": result.get("seed"),
  }


def _percent(mask: np.ndarray) -> float:
  return round(float(100.0 * np.mean(mask)), 6)


def _sanity_warnings(result, broken, correct, probs_like, margin) -> list[str]:
  """Flags that suggest gradient masking or a misconfigured evaluation."""
  warnings = []
  acc, kind = result["per_attack"], result["per_attack_kind"]
  if probs_like:
    warnings.append("the model's outputs look like probabilities, not logits; attacks on "
                    "logits of softmax outputs are weak")
  if result["zero_gradient_share"] > 0:
    warnings.append(f"{result['zero_gradient_share']:.2f}% of correctly classified points have "
                    "an all-zero input gradient: gradient-based attacks cannot move them")
  for weak, strong in _STRENGTH_ORDER:
    if weak in acc and strong in acc and kind[weak] == kind[strong] == "individual":
      if acc[strong] > acc[weak] + margin:
        warnings.append(
            f"{weak} ({acc[weak]:.2f}%) is stronger than {strong} ({acc[strong]:.2f}%): a "
            "weaker attack beating a stronger one suggests gradient masking")
  if "square" in broken:
    white = np.zeros_like(correct)
    for name in _WHITE_BOX:
      if name in broken:
        white |= broken[name]
    if any(name in broken for name in _WHITE_BOX):
      extra = _percent(broken["square"] & ~white)
      if extra > _SQUARE_ALPHA:
        warnings.append(
            f"the black-box Square attack broke {extra:.2f}% of the points that every white-box "
            "attack missed: the gradients are probably uninformative (gradient masking)")
  if result["eps"] > 0 and len(broken) > 0 and not any(b.any() for b in broken.values()) \
      and correct.sum() >= 100:
    warnings.append("no attack changed any prediction: check eps, the input range [0, 1] and "
                    "that logits_fn is differentiable")
  return warnings
