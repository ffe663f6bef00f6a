"""Runs training steps of Gaussian_DALE_PD in a fresh process and saves the params.

Used by tests/test_train.py so that each run can choose its device count (the
XLA flag must be set before JAX starts) or join a multi-process group.

  python tests/_step_worker.py OUT.npz DEVICES [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import os
import sys

out, devices = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dale_jax import configs, experiment, parallel  # noqa: E402
from dale_jax import steps as steps_lib  # noqa: E402

if len(sys.argv) > 3:
  coordinator, num_processes, process_id = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
  parallel.initialize_distributed(coordinator, num_processes, process_id)

config = configs.base_config("mnist_digits", "Gaussian_DALE_PD")
config.batch_size = 16
mesh = parallel.make_mesh()
exp = experiment.build(config, num_classes=10)
state = experiment.init_state(exp, jax.random.key(0), (28, 28, 1))
state = jax.device_put(state, parallel.replicated(mesh))
step = steps_lib.make_train_step(exp, mesh=mesh)
rng = np.random.RandomState(0)
rows = parallel.process_rows(config.batch_size)
for _ in range(2):
  x = rng.uniform(size=(16, 28, 28, 1)).astype(np.float32)
  y = rng.randint(0, 10, size=(16,)).astype(np.int32)
  batch = parallel.shard_batch({"image": x[rows], "label": y[rows]}, mesh)
  state, meters = step(state, batch)
flat = {jax.tree_util.keystr(k): np.asarray(jax.device_get(v))
        for k, v in jax.tree_util.tree_leaves_with_path(
            {"params": state.params, "nu": state.dual_state.nu})}
if jax.process_index() == 0:
  np.savez(out, devices=jax.device_count(), **flat)
