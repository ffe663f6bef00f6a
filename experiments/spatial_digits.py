"""Train DALE against rotations on the built-in digits, then look at rotated digits.

Run::

  python experiments/spatial_digits.py --workdir=runs/rotations

Trains Gaussian_DALE_PD with its Langevin sampler over rotations of up to 30
degrees (``--config=spatial:Gaussian_DALE_PD`` with ``perturbation.name=rotation``),
evaluates it with the exhaustive grid attack over 61 angles, and writes
``<workdir>/rotated_digits.png``: test digits turned by -30 ... 30 degrees, each
titled with the model's prediction (red where it is wrong). ``--epochs`` and
``--train_examples`` shorten the run. Rerunning continues from the checkpoint.
The library calls it makes are the three a user writes::

  config.perturbation.name = "rotation"                       # the training set
  config.eval.evaluators = ("Clean", "Grid")                  # the grid attack
  train.train_and_evaluate(config, workdir)
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import jax.numpy as jnp
import numpy as np

from dale_jax import checkpoint, configs, perturbations, train

ANGLES = (-30.0, -15.0, 0.0, 15.0, 30.0)


def rotation_config(epochs: int, train_examples: int, test_examples: int):
  spec = importlib.util.spec_from_file_location(
      "spatial", os.path.join(configs.CONFIG_DIR, "spatial.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("Gaussian_DALE_PD,rotation")
  config.eval.perturbation.name = "rotation"
  config.eval.grid_points = (61,)
  config.eval.evaluators = ("Clean", "Grid", "Worst-of-K")
  config.num_epochs = epochs
  config.schedule.boundaries = tuple(b for b in config.schedule.boundaries if b < epochs)
  config.schedule.scales = config.schedule.scales[:len(config.schedule.boundaries)]
  config.eval.every_epochs = epochs
  config.data.max_train_examples = train_examples
  config.eval.max_examples = test_examples
  return config


def plot_rotated_digits(logits_fn, x: np.ndarray, y: np.ndarray, path: str, count: int = 6):
  """Saves a grid: ``count`` digits (rows) at each of ANGLES (columns), with predictions."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency
  from matplotlib.figure import Figure

  x = jnp.asarray(x[:count])
  fig = Figure(figsize=(1.4 * len(ANGLES), 1.5 * count))
  FigureCanvasAgg(fig)
  for j, angle in enumerate(ANGLES):
    turned = perturbations.warp(x, jnp.full(count, angle), jnp.zeros(count), jnp.zeros(count))
    predicted = np.asarray(jnp.argmax(logits_fn(turned), -1))
    for i in range(count):
      ax = fig.add_subplot(count, len(ANGLES), i * len(ANGLES) + j + 1)
      ax.imshow(np.asarray(turned[i, ..., 0]), cmap="gray", vmin=0, vmax=1)
      ax.set_title(f"{angle:+.0f}°: {predicted[i]}", fontsize=8,
                   color="black" if predicted[i] == y[i] else "red")
      ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv=None):
  # argparse, not absl flags: importing this file next to the dale-* entry points (a
  # notebook, the tests) must not define their flags twice.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="run directory")
  parser.add_argument("--epochs", type=int, default=8, help="training epochs")
  parser.add_argument("--train_examples", type=int, default=0, help="0: all 4,000 digits")
  parser.add_argument("--test_examples", type=int, default=0, help="0: all 1,000 digits")
  args = parser.parse_args(argv)
  config = rotation_config(args.epochs, args.train_examples, args.test_examples)
  results = train.train_and_evaluate(config, args.workdir)
  _, logits_fn, dataset = checkpoint.load_trained(args.workdir)
  path = os.path.join(args.workdir, "rotated_digits.png")
  plot_rotated_digits(logits_fn, dataset.test[0], dataset.test[1], path)
  print({k: v for k, v in results.items() if k in ("Epoch", "Test")})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
