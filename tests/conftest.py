"""Shared fixtures: a tiny MLP for fast invariants and a small CNN trained on the built-in digits.

The MLP is a fixed random function ``R^d -> R^10`` (no training), cheap to trace and to
run, for every test that checks shapes, bounds, determinism or tracing. The trained CNN
is built once per session and used only where a sampler must be shown to move a loss
the right way, which needs a model whose gradients mean something.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

NUM_CLASSES = 10

# One persistent XLA compilation cache for the session, inherited by the dale-train and
# dale-eval processes that the tests start: they compile the same steps again and
# again. The programs are the same; only the compile time is saved. Every program is
# cached: JAX's default keeps only those that took over a second to compile, and most of
# the tests' programs are smaller than that.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="dale_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# submitit binds its log handlers to sys.stdout/sys.stderr when it is imported, which
# inside a test are pytest's capture streams, closed before submitit's last messages
# (job objects log when they are collected at exit): keep it from configuring logging.
os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")

# On CI (CI=true) every test must run: a cross-check that skips because an optional
# package failed to install would let a wrong number pass unseen.
ON_CI = os.environ.get("CI", "").lower() == "true"


def require(module: str):
  """``pytest.importorskip(module)``, except that on CI a missing module fails the test."""
  if not ON_CI:
    return pytest.importorskip(module)
  try:
    return importlib.import_module(module)
  except ImportError as e:
    pytest.fail(f"CI=true and {module} does not import ({e}): install it (.ci/run does)")


def pytest_sessionfinish(session, exitstatus):
  """On CI, a skipped test fails the run, naming what was skipped."""
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = reporter.stats.get("skipped", []) if reporter else []
  if ON_CI and skipped and exitstatus == 0:
    names = ", ".join(sorted({r.nodeid for r in skipped}))
    reporter.write_line(f"CI=true: {len(skipped)} test(s) skipped, which CI does not allow: "
                        f"{names}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def mlp_params(dim: int, hidden: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Weights of a ``dim -> hidden -> 10`` tanh MLP with O(1) logits.

  Moderate logits keep every ``p_y`` away from 0 and 1, so input gradients are well
  above float32 noise and their signs do not depend on the order of summation.
  """
  rng = np.random.default_rng(seed)
  return {
      "w1": (rng.standard_normal((dim, hidden)) * 1.5 / np.sqrt(dim)).astype(np.float32),
      "b1": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
      "w2": (rng.standard_normal((hidden, NUM_CLASSES)) * 0.3).astype(np.float32),
      "b2": (0.1 * rng.standard_normal(NUM_CLASSES)).astype(np.float32),
  }


def mlp_logits_fn(params: dict[str, np.ndarray], scale: float = 1.0) -> Callable:
  """``x -> scale * (tanh(flat(x) W1 + b1) W2 + b2)`` for NHWC (or any batched) ``x``."""

  def logits_fn(x):
    h = jnp.tanh(x.reshape((x.shape[0], -1)) @ params["w1"] + params["b1"])
    return scale * (h @ params["w2"] + params["b2"])

  return logits_fn


class TinyProblem(NamedTuple):
  logits_fn: Callable  # the MLP
  x: jax.Array
  y: jax.Array
  scaled: Callable  # scaled(s) -> the MLP with its logits multiplied by s (may be traced)


@pytest.fixture(scope="session")
def tiny():
  """A batch of 4 random 6x6x1 images in [0, 1], labels, and the tiny MLP on them."""
  shape = (4, 6, 6, 1)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0.0, 1.0, shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, shape[0]), jnp.int32)
  params = mlp_params(int(np.prod(shape[1:])))
  return TinyProblem(mlp_logits_fn(params), x, y, lambda s: mlp_logits_fn(params, s))


class TrainedCNN(NamedTuple):
  logits_fn: Callable  # eval-mode model, plain (not jitted) so samplers trace through it
  x: np.ndarray  # correctly classified test images
  y: np.ndarray
  accuracy: float  # test accuracy in [0, 1]


_TRAIN_STEPS = 80
_TRAIN_BATCH = 16


@pytest.fixture(scope="session")
def trained_cnn():
  """advbench's MNIST CNN after 80 SGD steps (batch 16) of clean cross-entropy.

  Reaches about 88% test accuracy on the built-in digits: enough for gradients that
  point somewhere, built in a few seconds of CPU time. ``x, y`` are the correctly
  classified images among the first 500 test images.
  """
  from dale_jax import data  # pylint: disable=import-outside-toplevel
  from dale_jax import models  # pylint: disable=import-outside-toplevel

  ds = data.load("mnist_digits")
  x_train, y_train = ds.train
  # Flax's initialisers: from PyTorch's (the training default) 80 steps reach only ~75 %.
  model = models.get_model("mnist_cnn", ds.num_classes, initializer="lecun")
  params = model.init(jax.random.key(0), jnp.zeros((1,) + ds.input_shape))["params"]
  tx = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss(p):
      logits = model.apply({"params": p}, xb, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(_TRAIN_STEPS):
    idx = rng.integers(0, len(x_train), _TRAIN_BATCH)
    params, opt_state = step(params, opt_state, x_train[idx], y_train[idx])

  logits_fn = lambda z: model.apply({"params": params}, z, train=False)
  x_test, y_test = ds.test
  x_test, y_test = x_test[:500], y_test[:500]
  correct = np.asarray(jax.jit(logits_fn)(x_test).argmax(-1) == y_test)
  return TrainedCNN(logits_fn, x_test[correct], y_test[correct], float(correct.mean()))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str):
  """``python -m module args`` with this checkout on the path; the completed process."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        timeout=600, check=False, env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.fixture(scope="session")
def pgd_tiny_run(tmp_path_factory):
  """A finished quickstart PGD run of one epoch on 96 digits: a model for dale-eval."""
  from dale_jax import train  # pylint: disable=import-outside-toplevel
  from dale_jax.configs import quickstart  # pylint: disable=import-outside-toplevel

  config = quickstart.get_config("PGD")
  config.update(num_epochs=1, batch_size=32)
  config.data.max_train_examples = 96
  config.sampler.steps = 1
  config.eval.update(max_examples=32, evaluators=("Clean",))
  config.model.initializer = "lecun"  # classifies most digits after these few steps
  workdir = str(tmp_path_factory.mktemp("pgd_tiny_run"))
  train.train_and_evaluate(config, workdir)
  return workdir
