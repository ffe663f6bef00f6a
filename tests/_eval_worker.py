"""Evaluates a finished run's checkpoint on the test split with advbench's evaluators.

Used by tests/test_layouts.py to compare the same weights on several device layouts
(the XLA flag must be set before JAX starts, hence a fresh process).

  python tests/_eval_worker.py WORKDIR OUT.json DEVICES EVAL_BATCH_SIZE
"""

import json
import os
import sys

workdir, out, devices, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"

import jax  # noqa: E402
import ml_collections  # noqa: E402

from dale_jax import checkpoint, data, experiment, parallel  # noqa: E402
from dale_jax import steps as steps_lib  # noqa: E402

with open(os.path.join(workdir, "config.json")) as f:
  config = ml_collections.ConfigDict(json.load(f))
dataset = data.load(config.dataset)
exp = experiment.build(config, num_classes=dataset.num_classes)
state = experiment.init_state(exp, jax.random.key(0), dataset.input_shape)
state, _ = checkpoint.restore(checkpoint.manager(workdir), state)
mesh = parallel.make_mesh()
x, y = dataset.test
x, y = x[:config.eval.max_examples], y[:config.eval.max_examples]
record = steps_lib.evaluate_split(
    steps_lib.make_eval_step(exp, mesh),
    jax.device_put(state.variables, parallel.replicated(mesh)), x, y, jax.random.key(7),
    batch_size=batch_size, mesh=mesh)
with open(out, "w") as f:
  json.dump({"devices": jax.device_count(), "record": record}, f)
