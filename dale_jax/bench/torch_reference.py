"""The dale_jax training step written in plain PyTorch, eager, the way advbench writes it.

This is the baseline that :mod:`dale_jax.bench.runner` times against the JAX step, and
the independent implementation that ``tests/test_bench.py`` checks the JAX step against.
It computes what :func:`dale_jax.train.train_step` computes for the same config:

1. perturbations from the config's sampler, model in ``eval()`` mode, gradient w.r.t.
   the input only (``torch.autograd.grad(loss, [x_adv])``);
2. the algorithm's loss on train-mode forwards of the clean and perturbed batches
   (clean first, as in :func:`dale_jax.train.train_step`), one ``torch.optim.SGD`` step
   (weight decay added to the gradient, heavy-ball momentum);
3. the dual update ``nu <- max(0, nu + eta_d (constraint - rho))``.

Where dale_jax deliberately differs from advbench the JAX definition is followed, so
that both sides compute the same function:

* the sampler starts at ``P(x + init_std N(0, I))`` (advbench does not project the
  start) and ascends the *sum* over the batch (advbench the mean; the sign step is the
  same);
* ``log(1 - p_y)`` is ``logsumexp_{j != y} z_j - logsumexp_j z_j`` (advbench's
  ``log(1 - softmax)`` is ``-inf`` where ``p_y`` rounds to 1);
* the TRADES sampler computes ``p(x)`` once per call (advbench recomputes it at every
  step), and the TRADES loss puts clean logits in its CE term (``loss.ce_on``).

Images are NCHW here (torch's layout); :func:`to_nchw` converts a dale_jax batch, and
:func:`load_flax_variables` / :func:`flax_variables` move weights between the two
implementations (the flatten before ``fc1`` is C, H, W in torch and H, W, C in the
Flax model, so ``fc1``'s rows are permuted, not just transposed).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dale_jax.bench import ALGORITHMS
from dale_jax.models.torch_weights import conv_to_flax as _conv_to_flax
from dale_jax.models.torch_weights import conv_to_torch as _conv_to_torch
from dale_jax.models.torch_weights import dense_to_torch as _linear_to_torch
from dale_jax.models.torch_weights import mnist_fc1_to_flax as _mnist_fc1_to_flax
from dale_jax.models.torch_weights import mnist_fc1_to_torch as _mnist_fc1_to_torch


# ----------------------------------------------------------------------------
# Models.


class MnistCNN(nn.Module):
  """advbench's MNIST network; returns ``log_softmax`` as advbench does."""

  def __init__(self, num_classes: int = 10, dropout_rates: tuple[float, float] = (0.25, 0.5)):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 32, 3, 1)
    self.conv2 = nn.Conv2d(32, 64, 3, 1)
    self.dropout1 = nn.Dropout(dropout_rates[0])
    self.dropout2 = nn.Dropout(dropout_rates[1])
    self.fc1 = nn.Linear(9216, 128)
    self.fc2 = nn.Linear(128, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.conv1(x))
    x = F.relu(self.conv2(x))
    x = F.max_pool2d(x, 2)
    x = self.dropout1(x)
    x = torch.flatten(x, 1)
    x = F.relu(self.fc1(x))
    x = self.dropout2(x)
    return F.log_softmax(self.fc2(x), dim=1)


class BasicBlock(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
  """CIFAR ResNet (kuangliu/pytorch-cifar, advbench's CIFAR-10/SVHN model); logits."""

  def __init__(self, num_classes: int = 10, stage_sizes=(2, 2, 2, 2), width: int = 64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    layers, in_planes = [], width
    for i, blocks in enumerate(stage_sizes):
      planes, stage = width * 2**i, []
      for j in range(blocks):
        stage.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1))
        in_planes = planes
      layers.append(nn.Sequential(*stage))
    self.layers = nn.ModuleList(layers)
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    for layer in self.layers:
      out = layer(out)
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return self.linear(out)


class Autocast(nn.Module):
  """``module`` run under ``torch.autocast(dtype)``, returning float32 outputs.

  The way PyTorch users train in mixed precision: parameters, gradients, optimizer
  state and the losses stay float32, autocast runs convolutions and matmuls in
  ``dtype`` (bfloat16 needs no gradient scaling: it has float32's exponent range).
  """

  def __init__(self, module: nn.Module, dtype: torch.dtype = torch.bfloat16):
    super().__init__()
    self.module = module
    self.dtype = dtype

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, dtype=self.dtype):
      out = self.module(x)
    return out.float()


def make_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
  """``mnist_cnn`` or ``resnet18`` (``kwargs`` as in the Flax models, e.g. ``width=8``)."""
  if name == "mnist_cnn":
    return MnistCNN(num_classes, **kwargs)
  if name == "resnet18":
    return ResNet(num_classes, **kwargs)
  raise ValueError(f"model must be 'mnist_cnn' or 'resnet18', got {name!r}")


# ----------------------------------------------------------------------------
# Weights to and from the Flax models.


def _resnet_pairs(model: ResNet):
  """(flax path, torch module, kind) for every parameterised layer of ``model``."""
  pairs = [(("conv1",), model.conv1, "conv"), (("bn1",), model.bn1, "bn")]
  for i, layer in enumerate(model.layers):
    for j, block in enumerate(layer):
      name = f"layer{i + 1}_{j}"
      pairs += [((name, "conv1"), block.conv1, "conv"), ((name, "bn1"), block.bn1, "bn"),
                ((name, "conv2"), block.conv2, "conv"), ((name, "bn2"), block.bn2, "bn")]
      if len(block.shortcut):
        pairs += [((name, "shortcut_conv"), block.shortcut[0], "conv"),
                  ((name, "shortcut_bn"), block.shortcut[1], "bn")]
  pairs.append((("linear",), model.linear, "linear"))
  return pairs


def _get(tree: Mapping, path) -> Mapping:
  for p in path:
    tree = tree[p]
  return tree


@torch.no_grad()
def load_flax_variables(model: nn.Module, variables: Mapping[str, Any]) -> nn.Module:
  """Copies Flax ``{'params', 'batch_stats'}`` of the same architecture into ``model``."""
  params = variables["params"]
  if isinstance(model, MnistCNN):
    for name in ("conv1", "conv2"):
      getattr(model, name).weight.copy_(_conv_to_torch(params[name]["kernel"]))
      getattr(model, name).bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
    model.fc1.weight.copy_(_mnist_fc1_to_torch(params["fc1"]["kernel"]))
    model.fc1.bias.copy_(torch.from_numpy(np.array(params["fc1"]["bias"])))
    model.fc2.weight.copy_(_linear_to_torch(params["fc2"]["kernel"]))
    model.fc2.bias.copy_(torch.from_numpy(np.array(params["fc2"]["bias"])))
    return model
  stats = variables.get("batch_stats", {})
  for path, module, kind in _resnet_pairs(model):
    p = _get(params, path)
    if kind == "conv":
      module.weight.copy_(_conv_to_torch(p["kernel"]))
    elif kind == "linear":
      module.weight.copy_(_linear_to_torch(p["kernel"]))
      module.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    else:
      module.weight.copy_(torch.from_numpy(np.array(p["scale"])))
      module.bias.copy_(torch.from_numpy(np.array(p["bias"])))
      s = _get(stats, path)
      module.running_mean.copy_(torch.from_numpy(np.array(s["mean"])))
      module.running_var.copy_(torch.from_numpy(np.array(s["var"])))
  return model


def flax_variables(model: nn.Module) -> dict[str, Any]:
  """``model``'s weights as Flax ``{'params', 'batch_stats'}`` NumPy trees."""
  if isinstance(model, MnistCNN):
    b = lambda m: m.bias.detach().cpu().numpy()
    return {"params": {
        "conv1": {"kernel": _conv_to_flax(model.conv1.weight), "bias": b(model.conv1)},
        "conv2": {"kernel": _conv_to_flax(model.conv2.weight), "bias": b(model.conv2)},
        "fc1": {"kernel": _mnist_fc1_to_flax(model.fc1.weight), "bias": b(model.fc1)},
        "fc2": {"kernel": model.fc2.weight.detach().cpu().numpy().T, "bias": b(model.fc2)},
    }, "batch_stats": {}}
  params, stats = {}, {}

  def put(tree, path, value):
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree[path[-1]] = value

  for path, module, kind in _resnet_pairs(model):
    if kind == "conv":
      put(params, path, {"kernel": _conv_to_flax(module.weight)})
    elif kind == "linear":
      put(params, path, {"kernel": module.weight.detach().cpu().numpy().T,
                         "bias": module.bias.detach().cpu().numpy()})
    else:
      put(params, path, {"scale": module.weight.detach().cpu().numpy(),
                         "bias": module.bias.detach().cpu().numpy()})
      put(stats, path, {"mean": module.running_mean.cpu().numpy(),
                        "var": module.running_var.cpu().numpy()})
  return {"params": params, "batch_stats": stats}


def to_nchw(images) -> torch.Tensor:
  """A dale_jax NHWC batch as a contiguous float32 NCHW tensor."""
  return torch.from_numpy(np.array(np.asarray(images, np.float32).transpose(0, 3, 1, 2), order="C"))


# ----------------------------------------------------------------------------
# Potentials (per example, as in dale_jax.potentials).


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  return F.cross_entropy(logits, y, reduction="none")


def log_one_minus_p(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  """``log(1 - p_y) = logsumexp_{j != y} z_j - logsumexp_j z_j``."""
  is_label = F.one_hot(y, logits.shape[-1]).bool()
  others = logits.masked_fill(is_label, float("-inf"))
  return torch.logsumexp(others, -1) - torch.logsumexp(logits, -1)


def kl_to_clean(logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
  """``KL(softmax(clean) || softmax(logits))`` per example."""
  log_p_clean = F.log_softmax(clean_logits, -1)
  return torch.sum(log_p_clean.exp() * (log_p_clean - F.log_softmax(logits, -1)), -1)


_POTENTIALS = {"cross_entropy": cross_entropy, "log_one_minus_p": log_one_minus_p}


# ----------------------------------------------------------------------------
# Samplers: sample(model, x, y) -> x_adv, model put in eval mode while sampling.


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
  x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
  return torch.clamp(x_adv, 0.0, 1.0)


def signed_ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                  objective: Callable[[torch.Tensor], torch.Tensor], eps: float,
                  step_size: float, steps: int, noise_scale: float = 0.0,
                  init_std: float = 0.0, start: torch.Tensor | None = None) -> torch.Tensor:
  """``x' <- P(x' + eta sign(grad_x' sum_i f_i(x')) + c N(0, I))`` from ``P(x + s N)``.

  ``objective(logits) -> (batch,)``. ``start`` replaces the random start
  ``x + s N`` (to replay another implementation's draw). The model is in
  ``eval()`` mode during the loop and back in ``train()`` mode afterwards, as in
  advbench.
  """
  model.eval()
  x = x.detach()
  if start is not None:
    x_adv = start.detach()
  else:
    x_adv = x + init_std * torch.randn_like(x) if init_std else x.clone()
  x_adv = _project(x_adv, x, eps)
  for _ in range(steps):
    x_adv.requires_grad_(True)
    loss = objective(model(x_adv)).sum()
    grad, = torch.autograd.grad(loss, [x_adv])
    x_adv = x_adv.detach() + step_size * torch.sign(grad)
    if noise_scale:
      x_adv = x_adv + noise_scale * torch.randn_like(x_adv)
    x_adv = _project(x_adv, x, eps)
  model.train()
  return x_adv.detach()


def make_sampler(config: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
  """``sample(model, x, y, start=None)`` from a dale_jax ``sampler`` section (Linf samplers)."""
  config = dict(config)
  name = config.pop("name", None)
  norm = config.pop("norm", "linf")
  if norm != "linf":
    raise ValueError(f"the torch reference implements norm='linf' only, got {norm!r}")
  if name == "pgd":
    if config.get("random_start") or config.get("restarts", 1) != 1:
      raise ValueError("the torch reference implements PGD from x with one restart")
    potential = _POTENTIALS[config.get("potential", "cross_entropy")]
    return lambda model, x, y, start=None: signed_ascent(
        model, x, y, objective=lambda z: potential(z, y), eps=config["eps"],
        step_size=config["step_size"], steps=config["steps"], start=start)
  if name == "langevin_gaussian":
    potential = _POTENTIALS[config.get("potential", "log_one_minus_p")]
    return lambda model, x, y, start=None: signed_ascent(
        model, x, y, objective=lambda z: potential(z, y), eps=config["eps"],
        step_size=config["step_size"], steps=config["steps"],
        noise_scale=config["noise_scale"], init_std=config.get("init_std", 0.001), start=start)
  if name == "trades_kl":
    def sample(model, x, y, start=None):
      model.eval()
      with torch.no_grad():
        clean = model(x)
      return signed_ascent(
          model, x, y, objective=lambda z: kl_to_clean(z, clean), eps=config["eps"],
          step_size=config["step_size"], steps=config["steps"],
          init_std=config.get("init_std", 0.001), start=start)
    return sample
  raise ValueError(f"the torch reference implements samplers 'pgd', 'langevin_gaussian' and "
                   f"'trades_kl', got {name!r}")


# ----------------------------------------------------------------------------
# The training step.


def _mean_ce(logits, y):
  return F.cross_entropy(logits, y)


def _trades_kl(clean, adv):
  return kl_to_clean(adv, clean).mean()


class TrainStep:
  """``step(x, y) -> meters``: one training step of ``config.algorithm``, in place.

  Args:
    model: a torch model in ``train()`` mode (``torch.compile``-d or not).
    config: a dale_jax config (``algorithm``, ``sampler``, ``loss``, ``dual``,
      ``optimizer``); the learning rate is constant.
  """

  def __init__(self, model: nn.Module, config):
    algorithm = config.algorithm
    if algorithm not in ALGORITHMS:
      raise ValueError(f"algorithm must be one of {ALGORITHMS} for the torch reference, "
                       f"got {algorithm!r}")
    self.model = model
    self.algorithm = algorithm
    o = config.optimizer
    self.optimizer = torch.optim.SGD(model.parameters(), lr=o.learning_rate,
                                     momentum=o.momentum, weight_decay=o.weight_decay,
                                     nesterov=o.nesterov)
    self.sampler = make_sampler(config.sampler.to_dict()) if algorithm != "ERM" else None
    self.loss_config = config.loss.to_dict()
    dual = config.dual.to_dict()
    device = next(model.parameters()).device
    self.nu = torch.tensor(float(dual.get("init_value", 1.0)), device=device) if dual else None
    self.dual_step = float(dual.get("step_size", 0.0)) if dual else 0.0
    self.margin = float(dual.get("margin", 0.0)) if dual else 0.0
    if dual and dual.get("every", "step") != "step":
      raise ValueError("the torch reference updates the dual variable every step")

  def _loss(self, clean, adv, y):
    a, cfg = self.algorithm, self.loss_config
    if a == "ERM":
      return _mean_ce(clean, y), None
    if a == "PGD":
      return _mean_ce(adv, y), None
    if a == "TRADES":
      ce = _mean_ce(clean if cfg.get("ce_on", "clean") == "clean" else adv, y)
      return ce + cfg["beta"] * _trades_kl(clean, adv), None
    clean_loss = _mean_ce(clean, y)
    robust = _trades_kl(clean, adv) if a == "KL_DALE_PD" else _mean_ce(adv, y)
    nu = cfg.get("nu_fixed", 0.1) if self.nu is None else self.nu
    return robust + nu * clean_loss, clean_loss

  def __call__(self, x: torch.Tensor, y: torch.Tensor,
               start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One step on ``(x, y)``; ``start`` replaces the sampler's random start."""
    adv_x = self.sampler(self.model, x, y, start=start) if self.sampler is not None else None
    self.optimizer.zero_grad(set_to_none=True)
    clean = self.model(x) if self.algorithm != "PGD" else None
    adv = self.model(adv_x) if adv_x is not None else None
    loss, constraint = self._loss(clean, adv, y)
    loss.backward()
    self.optimizer.step()
    if self.nu is not None:
      # Kept on the device: no host synchronisation inside the step.
      self.nu = torch.clamp(self.nu + self.dual_step * (constraint.detach() - self.margin), min=0.0)
    return {"Loss": loss.detach()}
