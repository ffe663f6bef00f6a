"""Times the full training step of dale_jax against the PyTorch reference.

What is timed is one complete training step after warm-up: the sampler loop, the
primal update and the dual update, on a fixed synthetic batch that already sits
on the device. Each framework runs in its own worker process (its own threads,
its own peak memory), started once; the parent then interleaves the repeats
(``jax``, ``torch``, ``torch-compile``, ``jax``, ...) so that a change in machine
load hits every framework alike, and reports medians and spreads. Ratios are
only ever taken between numbers of the same run.

Frameworks:

* ``jax``: :func:`dale_jax.steps.make_train_step` (jitted, state donated), with
  ``devices`` simulated host devices (``--xla_force_host_platform_device_count``)
  when asked, the batch split over them;
* ``torch``: :class:`dale_jax.bench.torch_reference.TrainStep`, eager;
* ``torch-compile``: the same with the model wrapped in ``torch.compile``.

All start from the same weights (the JAX initialisation, copied to torch).

Per framework the result holds: images/s (median, min, max over repeats), step
time, compile time (``jax``: lowering + XLA compilation; ``torch-compile``: first
steps minus steady steps; ``torch``: 0), peak resident memory of the worker,
XLA's buffer footprint of the step, the device name, the step's matmul/conv
FLOPs (:mod:`dale_jax.bench.flops`, the same count for every framework since
they compute the same thing) and the achieved FLOP/s as a share of the device's
matmul peak, measured here as the best rate of a large float32 matmul in either
framework (2048 square on a CPU, 8192 on a GPU); on a GPU also as a share of the
bfloat16 matmul peak, measured the same way.

On a GPU both frameworks compute float32 convolutions and matmuls in TF32, XLA's
default there; the torch workers turn TF32 on for matmuls too (cuDNN convolutions
already use it by default) and set ``cudnn.benchmark``, as a tuned PyTorch run does.

Both workers set glibc's malloc to keep freed blocks
(:func:`dale_jax.host_memory.keep_freed_memory`, as the command-line tools do);
each result says so in ``malloc`` (``keep``, or ``system`` with
``DALE_JAX_MALLOC=system``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Iterable, Sequence

from dale_jax import host_memory
from dale_jax import validation
from dale_jax.bench import ALGORITHMS

FRAMEWORKS = ("jax", "torch", "torch-compile")
MODELS = ("mnist_cnn", "resnet18")
PRECISIONS = ("float32", "bfloat16")
_PROTOCOL = "@@dale-bench "


@dataclasses.dataclass(frozen=True)
class Options:
  """One benchmark setting (one batch size, one device count).

  Attributes:
    algorithm: a dale_jax algorithm name implemented by the torch reference
      (see :data:`dale_jax.bench.torch_reference.ALGORITHMS`).
    model: ``mnist_cnn`` (MNIST shapes, advbench's MNIST hyperparameters) or
      ``resnet18`` (CIFAR-10 shapes and hyperparameters).
    batch_size: global batch.
    steps: training steps per timed repeat.
    repeats: timed repeats per framework.
    warmup: untimed steps after compilation.
    devices: simulated host devices for ``jax`` (1 = the default platform).
    width: ResNet width (64 is ResNet-18); ignored for the MNIST CNN.
    sampler_chunk: the config's ``sampler_chunk_size`` for ``jax`` (examples per
      device the sampler perturbs at a time; 0 = the whole batch; ``None`` = the
      config's default for the platform, see :func:`dale_jax.steps.sampler_chunk_size`).
    seed: seed of the weights and the synthetic batch.
    precision: ``float32``, or ``bfloat16``: ``jax`` runs with
      ``config.model.dtype = "bfloat16"``, the torch workers under
      ``torch.autocast(dtype=torch.bfloat16)`` (float32 weights, optimizer and
      losses on both sides).
  """

  algorithm: str = "Gaussian_DALE_PD"
  model: str = "mnist_cnn"
  batch_size: int = 64
  steps: int = 20
  repeats: int = 5
  warmup: int = 2
  devices: int = 1
  width: int = 64
  sampler_chunk: int | None = None
  seed: int = 0
  precision: str = "float32"

  def validate(self) -> None:
    validation.one_of("algorithm", self.algorithm, ALGORITHMS)
    validation.one_of("model", self.model, MODELS)
    validation.one_of("precision", self.precision, PRECISIONS)
    for name in ("batch_size", "steps", "repeats", "devices", "width"):
      validation.integer(name, getattr(self, name), minimum=1)
    validation.integer("warmup", self.warmup, minimum=0)
    chunk = self.sampler_chunk
    validation.require(chunk is None or (validation.is_integer(chunk) and chunk >= 0),
                       "sampler_chunk", "None (the platform's default), 0 (the whole batch) or "
                       "a positive integer", chunk)
    validation.require(self.batch_size % self.devices == 0, "batch_size",
                       f"divisible by devices={self.devices}", self.batch_size)


# ----------------------------------------------------------------------------
# Shared set-up (runs inside a worker).


def make_config(options: Options):
  """The dale_jax config of the benchmarked step (advbench defaults, constant lr)."""
  from dale_jax import configs

  dataset = "mnist" if options.model == "mnist_cnn" else "cifar10"
  config = configs.base_config(dataset, options.algorithm)
  config.model.name = options.model
  config.batch_size = options.batch_size
  config.seed = options.seed
  config.schedule.boundaries = ()
  config.schedule.scales = ()
  config.data.augment = False  # Both sides time the same step, without augmentation.
  config.sampler_chunk_size = options.sampler_chunk
  config.model.dtype = options.precision
  return config


def input_shape(model: str) -> tuple[int, int, int]:
  return (28, 28, 1) if model == "mnist_cnn" else (32, 32, 3)


def synthetic_batch(options: Options) -> dict:
  """A fixed NHWC batch in ``[0, 1]`` with labels, as NumPy arrays."""
  import numpy as np

  rng = np.random.default_rng(options.seed)
  shape = (options.batch_size,) + input_shape(options.model)
  return {"image": rng.random(shape, dtype=np.float32),
          "label": rng.integers(0, 10, options.batch_size).astype(np.int32)}


def _model_kwargs(options: Options) -> dict:
  return {} if options.model == "mnist_cnn" else {"width": options.width}


def initial_variables(options: Options):
  """The JAX model's initial variables (both frameworks start from these)."""
  import jax

  from dale_jax.models import get_model, init_variables

  model = get_model(options.model, 10, **_model_kwargs(options))
  return init_variables(model, jax.random.PRNGKey(options.seed), input_shape(options.model))


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
  except OSError:
    pass
  return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------
# Workers.


class _JaxWorker:
  def __init__(self, options: Options):
    import jax
    import jax.numpy as jnp

    from dale_jax import parallel
    from dale_jax import experiment
    from dale_jax import steps
    from dale_jax.bench import flops

    self.jax = jax
    config = make_config(options)
    devices = jax.devices()[:options.devices]
    validation.require(len(devices) >= options.devices, "devices",
                       f"at most the {len(devices)} visible", options.devices)
    mesh = jax.sharding.Mesh(devices, (parallel.DATA_AXIS,))
    variables = initial_variables(options)
    exp = experiment.build(config, num_classes=10)
    state = experiment.init_state(exp, jax.random.PRNGKey(options.seed),
                                  input_shape(options.model))
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                          opt_state=state.tx.init(variables["params"]))
    repl, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    if _model_kwargs(options) in ({}, {"width": 64}):
      step = steps.make_train_step(exp, mesh=mesh)  # The step dale-train runs.
    else:  # The same step for a narrower ResNet.
      model = exp.model.clone(**_model_kwargs(options))
      algorithm = steps.chunked(exp.algorithm, config, num_devices=len(devices),
                                platform=devices[0].platform)
      step = jax.jit(lambda s, b: steps.train_step(s, b, model=model, algorithm=algorithm),
                     in_shardings=(repl, sharded), out_shardings=(repl, repl), donate_argnums=0)
    batch = jax.device_put({k: jnp.asarray(v) for k, v in synthetic_batch(options).items()},
                           sharded)
    state = jax.device_put(state, repl)
    self.flops = flops.count_flops(step, state, batch)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    self.compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    self.xla_bytes = None
    if memory is not None:
      self.xla_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    self.step, self.state, self.batch = compiled, state, batch
    self.device = f"{devices[0].platform}: {devices[0].device_kind}"
    self.accelerator = devices[0].platform != "cpu"
    if devices[0].platform == "cpu":
      self.device = f"cpu: {cpu_name()}"
    self.devices = len(devices)
    self.sampler_chunk = steps.sampler_chunk_size(config, devices[0].platform)

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    state = self.state
    for _ in range(steps):
      state, meters = self.step(state, self.batch)
    self.jax.block_until_ready((state, meters))
    self.state = state
    return time.perf_counter() - start

  def matmul_gflops(self, dtype: str = "float32", tries: int = 5) -> float:
    n = _peak_size(self.accelerator)
    a = self.jax.random.normal(self.jax.random.PRNGKey(0), (n, n), dtype)
    f = self.jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(tries))
    return 2 * n**3 / best / 1e9

  def memory(self) -> dict:
    out = {"peak_rss_mib": round(_peak_rss_mib(), 1)}
    if self.xla_bytes is not None:
      out["xla_buffers_mib"] = round(self.xla_bytes / 2**20, 1)
    stats = self.jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return out

  def profile(self, steps: int, top: int) -> list[dict]:
    from dale_jax.bench import profile

    return profile.top_ops(lambda: self.run(1), self.step.as_text(), steps=steps, top=top)


class _TorchWorker:
  def __init__(self, options: Options, compile_model: bool):
    import torch

    from dale_jax.bench import torch_reference as tr

    self.torch = torch
    self.accelerator = torch.cuda.is_available()  # CUDA here.
    if self.accelerator:
      # What a tuned PyTorch run sets, and the precision XLA uses by default for
      # float32 convolutions and matmuls on such a GPU (TF32), so both sides
      # compute at the same precision.
      torch.backends.cudnn.benchmark = True
      torch.backends.cuda.matmul.allow_tf32 = True
      torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda" if self.accelerator else "cpu")
    config = make_config(options)
    model = tr.make_model(options.model, 10, **_model_kwargs(options))
    tr.load_flax_variables(model, initial_variables(options))
    model = model.to(dev).train()
    batch = synthetic_batch(options)
    self.x = tr.to_nchw(batch["image"]).to(dev)
    self.y = torch.from_numpy(batch["label"]).long().to(dev)
    model = torch.compile(model) if compile_model else model
    if options.precision != "float32":
      model = tr.Autocast(model, getattr(torch, options.precision))
    self.train_step = tr.TrainStep(model, config)
    self.flops = None
    self.compile_s = 0.0
    if compile_model:
      first = self.run(1)
      steady = min(self.run(1) for _ in range(2))
      self.compile_s = max(0.0, first - steady)
    self.device = (f"cuda: {torch.cuda.get_device_name()}" if self.accelerator
                   else f"cpu: {cpu_name()}")
    self.devices = 1
    self.sampler_chunk = 0

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      meters = self.train_step(self.x, self.y)
    float(meters["Loss"])  # Waits for the device.
    return time.perf_counter() - start

  def matmul_gflops(self, dtype: str = "float32", tries: int = 5) -> float:
    torch = self.torch
    n = _peak_size(self.accelerator)
    a = torch.randn((n, n), device=self.x.device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if self.accelerator else (lambda: None)
    a @ a
    sync()
    best = min(_timed(lambda: (a @ a, sync())) for _ in range(tries))
    return 2 * n**3 / best / 1e9

  def memory(self) -> dict:
    out = {"peak_rss_mib": round(_peak_rss_mib(), 1)}
    if self.accelerator:
      out["device_peak_mib"] = round(self.torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _peak_size(accelerator: bool) -> int:
  """Side of the square matmul that measures the matmul peak (large enough to saturate)."""
  return 8192 if accelerator else 2048


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _send(obj: dict) -> None:
  sys.stdout.write(_PROTOCOL + json.dumps(obj) + "\n")
  sys.stdout.flush()


def worker_main(framework: str, options: Options) -> None:
  """Runs one framework and answers the parent's commands on stdin (one JSON per line).

  Both frameworks run with :func:`dale_jax.host_memory.keep_freed_memory`, as the
  command-line tools do (``DALE_JAX_MALLOC=system`` turns it off for both).
  """
  try:
    malloc = "keep" if host_memory.keep_freed_memory() else "system"
    if framework == "jax":
      worker = _JaxWorker(options)
    else:
      worker = _TorchWorker(options, compile_model=framework == "torch-compile")
    if options.warmup:
      worker.run(options.warmup)
    _send({"ready": True, "compile_s": worker.compile_s, "device": worker.device,
           "devices": worker.devices, "flops": worker.flops, "malloc": malloc,
           "sampler_chunk": worker.sampler_chunk})
  except Exception as e:  # Reported to the parent, which names the framework.
    _send({"error": f"{type(e).__name__}: {e}"})
    return
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "run":
      _send({"seconds": worker.run(cmd["steps"])})
    elif cmd["cmd"] == "peak":
      reply = {"gflops": worker.matmul_gflops("float32")}
      if worker.accelerator:
        reply["bf16_gflops"] = worker.matmul_gflops("bfloat16")
      _send(reply)
    elif cmd["cmd"] == "profile":
      _send({"ops": worker.profile(cmd["steps"], cmd["top"]) if framework == "jax" else []})
    elif cmd["cmd"] == "finish":
      _send(worker.memory())
      return


class _Worker:
  """The parent's handle on a worker process."""

  def __init__(self, framework: str, options: Options, env: dict | None = None):
    self.framework = framework
    args = [sys.executable, "-m", "dale_jax.bench.runner", "--worker", framework,
            json.dumps(dataclasses.asdict(options))]
    self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)

  def read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(_PROTOCOL):
        reply = json.loads(line[len(_PROTOCOL):])
        if "error" in reply:
          raise RuntimeError(f"{self.framework} worker failed: {reply['error']}")
        return reply
    raise RuntimeError(f"{self.framework} worker exited with code {self.proc.wait()} "
                       "(its stderr is above)")

  def ask(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()


def _worker_env(devices: int) -> dict:
  env = dict(os.environ)
  # On a GPU the frameworks share the card: JAX takes memory as it needs it
  # instead of 75% of it up front, so the torch workers fit beside it.
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if devices > 1:
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


# ----------------------------------------------------------------------------
# The parent.


def run(options: Options, frameworks: Iterable[str] = FRAMEWORKS, *, profile_top: int = 0,
        precisions: Sequence[str] | None = None, log=None) -> list[dict]:
  """Benchmarks ``frameworks`` on ``options``; one result dict per framework and precision.

  ``precisions`` (default: ``options.precision`` alone) runs every framework at each
  of them, all workers interleaved in the same repeats, so that a bfloat16 step can be
  compared with a float32 one of the same run. Each result has ``speedup_vs_torch``
  (against eager torch at the same precision) and, when float32 torch ran,
  ``speedup_vs_torch_float32``.

  ``log(message)`` is called with progress lines (e.g. ``print`` to stderr).
  With ``profile_top > 0`` the ``jax`` results also list the XLA ops that took
  the most time (see :mod:`dale_jax.bench.profile`).
  """
  precisions = list(dict.fromkeys(precisions or [options.precision]))
  settings = {p: dataclasses.replace(options, precision=p) for p in precisions}
  for o in settings.values():
    o.validate()
  frameworks = list(dict.fromkeys(frameworks))
  for f in frameworks:
    validation.one_of("framework", f, FRAMEWORKS)
  if options.devices > 1 and frameworks != ["jax"]:
    raise validation.InvalidArgument(
        "devices", rest="> 1 simulates JAX host devices; run it with framework 'jax' only")
  log = log or (lambda message: None)
  keys = [(f, p) for p in precisions for f in frameworks]
  name = lambda key: key[0] if len(precisions) == 1 else f"{key[0]} {key[1]}"
  workers, ready = {}, {}
  try:
    for key in keys:
      f, p = key
      log(f"starting {name(key)} (compile and {options.warmup} warm-up steps)")
      workers[key] = _Worker(f, settings[p], _worker_env(options.devices if f == "jax" else 1))
      ready[key] = workers[key].read()
    times = {key: [] for key in keys}
    for r in range(options.repeats):
      for key in keys:
        times[key].append(workers[key].ask(cmd="run", steps=options.steps)["seconds"])
      log(f"repeat {r + 1}/{options.repeats}: " + ", ".join(
          f"{name(k)} {options.batch_size * options.steps / times[k][-1]:.0f} img/s" for k in keys))
    peaks = [workers[k].ask(cmd="peak") for k in keys if k[1] == precisions[0]]
    peak = max(p["gflops"] for p in peaks)
    bf16_peak = max((p["bf16_gflops"] for p in peaks if "bf16_gflops" in p), default=None)
    profiles = {}
    if profile_top:
      for key in keys:
        if key[0] == "jax":
          profiles[key] = workers[key].ask(cmd="profile", steps=3, top=profile_top)["ops"]
    memory = {key: workers[key].ask(cmd="finish") for key in keys}
  finally:
    for w in workers.values():
      w.close()
  results = {}
  for key in keys:
    f, p = key
    flops = next((ready[k]["flops"] for k in keys if k[1] == p and ready[k]["flops"]), None)
    images = [options.batch_size * options.steps / t for t in times[key]]
    step_s = statistics.median(times[key]) / options.steps
    result = {
        "framework": f,
        "algorithm": options.algorithm,
        "model": options.model,
        "batch_size": options.batch_size,
        "devices": ready[key]["devices"],
        "precision": p,
        "images_per_sec": round(statistics.median(images), 1),
        "images_per_sec_min": round(min(images), 1),
        "images_per_sec_max": round(max(images), 1),
        "step_ms": round(step_s * 1e3, 2),
        "compile_s": round(ready[key]["compile_s"], 2),
        **memory[key],
        "device": ready[key]["device"],
        "malloc": ready[key]["malloc"],
        "sampler_chunk": ready[key]["sampler_chunk"],
        "repeats": options.repeats,
        "steps": options.steps,
    }
    if flops:
      result["gflops_per_step"] = round(flops / 1e9, 3)
      result["achieved_gflops"] = round(flops / step_s / 1e9, 1)
      result["matmul_peak_gflops"] = round(peak, 1)
      result["share_of_peak"] = round(flops / step_s / 1e9 / peak, 4)
      if bf16_peak:
        result["bf16_matmul_peak_gflops"] = round(bf16_peak, 1)
        result["share_of_bf16_peak"] = round(flops / step_s / 1e9 / bf16_peak, 4)
    if key in profiles:
      result["top_ops"] = profiles[key]
    results[key] = result
  for (f, p), r in results.items():
    if ("torch", p) in results:
      r["speedup_vs_torch"] = round(r["images_per_sec"] / results["torch", p]["images_per_sec"], 3)
    if p != "float32" and ("torch", "float32") in results:
      r["speedup_vs_torch_float32"] = round(
          r["images_per_sec"] / results["torch", "float32"]["images_per_sec"], 3)
  return list(results.values())


def format_table(results: list[dict]) -> str:
  """A small fixed-width table of :func:`run`'s results."""
  head = ("framework", "precision", "dev", "batch", "img/s [min-max]", "step ms", "compile s",
          "peak MiB", "% peak", "vs torch", "vs torch fp32")
  rows = [head]
  for r in results:
    rows.append((
        r["framework"], r.get("precision", "float32"), str(r["devices"]), str(r["batch_size"]),
        f"{r['images_per_sec']:.0f} [{r['images_per_sec_min']:.0f}-{r['images_per_sec_max']:.0f}]",
        f"{r['step_ms']:.1f}", f"{r['compile_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
        f"{100 * r['share_of_peak']:.1f}" if "share_of_peak" in r else "-",
        f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else "-",
        f"{r['speedup_vs_torch_float32']:.2f}x" if "speedup_vs_torch_float32" in r else "-"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--worker":
    worker_main(sys.argv[2], Options(**json.loads(sys.argv[3])))
  else:
    sys.exit("usage: python -m dale_jax.bench.runner --worker FRAMEWORK OPTIONS_JSON "
             "(started by dale-bench)")
