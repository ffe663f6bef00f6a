"""The dale_jax training step written in plain PyTorch, eager, the way advbench writes it,
and the PyTorch networks of dale_jax's architectures.

The networks (:func:`make_model`, :data:`ARCHS`) are those of the published code, with
its ``state_dict`` keys: advbench's MNIST network, kuangliu/pytorch-cifar's ResNet-18,
Wong et al.'s and RobustBench's PreAct ResNet-18, TRADES', MART's and RobustBench's
WideResNets; :func:`load_state_dict` loads a checkpoint into one, and
:mod:`dale_jax.bench.autoattack` times torchattacks on them.

This is the baseline that :mod:`dale_jax.bench.runner` times against the JAX step, and
the independent implementation that ``tests/test_bench.py`` checks the JAX step against.
Its samplers and losses transcribe advbench's ``attacks.py`` and ``algorithms.py``
(arobey1/advbench bd2071d; Worst_Of_K's and MH's from the fork constrainedlearning/advbench
31c09cb) and compute what :func:`dale_jax.steps.train_step` computes for the same config:

1. perturbations from the config's sampler, model in ``eval()`` mode, gradient w.r.t.
   the input only (``torch.autograd.grad(loss, [x_adv])``) of advbench's *batch-mean*
   loss (dale_jax ascends the sum: the sign steps are the same, and the Laplacian
   noise, added to the gradient inside the sign, is scaled by ``mean_over`` there);
2. the algorithm's loss on train-mode forwards of the clean and perturbed batches
   (clean first, as in :func:`dale_jax.steps.train_step`), one ``torch.optim.SGD`` step
   (weight decay added to the gradient, heavy-ball momentum);
3. the dual update ``nu <- max(0, nu + eta_d (constraint - rho))``, or with
   ``dual.every="epoch"`` (DALE, the paper's Algorithm 1) once per epoch by the sum
   of the epoch's per-step moves.

Every random draw goes through a ``noise(kind, shape, *, draw, step)`` callable
(:data:`NOISE_KINDS`; :func:`torch_noise` draws with torch, as advbench does), so that
a test can feed both implementations the same draws.

Where dale_jax deliberately differs from advbench the JAX definition is followed, so
that both sides compute the same function:

* the Gaussian start is projected, ``P(x + init_std N(0, I))`` (advbench does not
  project it);
* ``log(1 - p_y)`` is ``logsumexp_{j != y} z_j - logsumexp_j z_j`` (advbench's
  ``log(1 - softmax)`` is ``-inf`` where ``p_y`` rounds to 1);
* the TRADES sampler computes ``p(x)`` once per call (advbench recomputes it at every
  step), and the TRADES loss puts clean logits in its CE term (``loss.ce_on``);
* ERM_DataAug averages the CE of its ``M`` perturbed draws (advbench averages the
  clean CE ``M`` times);
* CVaR draws its ``M`` perturbations once and takes its t-steps per example on their
  losses (advbench redraws at every t-step and divides the t-step by the batch size);
  as advbench, CVaR_SGD(_PD) take the loss at the t before the last of their
  ``n_steps`` updates, CVaR_SGD_Autograd after all of them;
* one train-mode forward of the clean batch and one of all the perturbed draws
  together (advbench forwards each loss term on its own; only BatchNorm's
  statistics can tell the difference);
* Worst_Of_K's candidates and MH's start are uniform in the ball (the fork draws its
  perturbation sets' ``delta_init``; its Linf ``MH`` cannot be built).

Images are NCHW here (torch's layout); :func:`to_nchw` converts a dale_jax batch, and
:func:`load_flax_variables` / :func:`flax_variables` move weights between the two
implementations (the flatten before ``fc1`` is C, H, W in torch and H, W, C in the
Flax model, so ``fc1``'s rows are permuted, not just transposed).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions.laplace import Laplace

from dale_jax import validation
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
  """CIFAR ResNet (kuangliu/pytorch-cifar, advbench's CIFAR-10/SVHN model); logits.

  Stages are the attributes ``layer1`` ... ``layer4``, so that the ``state_dict`` has
  kuangliu's and RobustBench's keys (:mod:`dale_jax.models.torch_weights`).
  """

  def __init__(self, num_classes: int = 10, stage_sizes=(2, 2, 2, 2), width: int = 64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    in_planes = width
    for i, blocks in enumerate(stage_sizes):
      planes, stage = width * 2**i, []
      for j in range(blocks):
        stage.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1))
        in_planes = planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
    self.num_stages = len(stage_sizes)
    self.linear = nn.Linear(in_planes, num_classes)

  @property
  def layers(self) -> list[nn.Sequential]:
    return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    for layer in self.layers:
      out = layer(out)
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return self.linear(out)


class PreActBlock(nn.Module):
  """Wong et al.'s and RobustBench's ``PreActBlock``: the shortcut is a 1x1 conv of
  ``relu(bn1(x))`` (no BatchNorm) when the shape changes, ``x`` otherwise."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
    out = self.conv2(F.relu(self.bn2(self.conv1(out))))
    return out + shortcut


class PreActResNet(nn.Module):
  """Wong et al.'s and RobustBench's ``PreActResNet18`` (BN-ReLU ``bn`` after the last
  stage, as :class:`dale_jax.models.PreActResNet` with ``final_norm=True``); logits."""

  def __init__(self, num_classes: int = 10, stage_sizes=(2, 2, 2, 2), width: int = 64):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    in_planes = width
    for i, blocks in enumerate(stage_sizes):
      planes, stage = width * 2**i, []
      for j in range(blocks):
        stage.append(PreActBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1))
        in_planes = planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
    self.num_stages = len(stage_sizes)
    self.bn = nn.BatchNorm2d(in_planes)
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.conv1(x)
    for i in range(self.num_stages):
      out = getattr(self, f"layer{i + 1}")(out)
    out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
    return self.linear(out)


class WideBasicBlock(nn.Module):
  """TRADES' and MART's ``wideresnet.BasicBlock`` (no dropout)."""

  def __init__(self, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
    self.equal_in_out = in_planes == out_planes
    self.convShortcut = None if self.equal_in_out else nn.Conv2d(  # pylint: disable=invalid-name
        in_planes, out_planes, 1, stride, 0, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    a = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return out + (x if self.equal_in_out else self.convShortcut(a))


class NetworkBlock(nn.Module):
  """TRADES' group of ``nb_layers`` wide blocks, under the name ``layer``."""

  def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(*[
        WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(nb_layers)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layer(x)


class WideResNet(nn.Module):
  """TRADES', MART's and RobustBench's ``WideResNet``; logits.

  ``sub_block1=True`` also builds TRADES' and MART's ``sub_block1``, a group that no
  forward calls but their checkpoints hold (RobustBench builds it only when asked).
  """

  def __init__(self, num_classes: int = 10, depth: int = 34, widen_factor: int = 10,
               sub_block1: bool = False):
    super().__init__()
    channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
    self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
    if sub_block1:
      self.sub_block1 = NetworkBlock(n, channels[0], channels[1], 1)
    self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
    self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.fc = nn.Linear(channels[3], num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = F.adaptive_avg_pool2d(F.relu(self.bn1(out)), 1).flatten(1)
    return self.fc(out)


class Normalized(nn.Module):
  """RobustBench's input normalisation: ``module((x - mean) / std)`` per channel, the
  PyTorch side of :func:`dale_jax.models.normalized`."""

  def __init__(self, module: nn.Module, mean, std):
    super().__init__()
    self.module = module
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.module((x - self.mean) / self.std)


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


# The PyTorch class of each architecture of dale_jax.models.torch_weights, with the
# keyword arguments that make it the architecture.
ARCHS = {
    "mnist_cnn": (MnistCNN, {}),
    "resnet18": (ResNet, {}),
    "preact_resnet18": (PreActResNet, {}),
    "wrn28_10": (WideResNet, dict(depth=28)),
    "wrn34_10": (WideResNet, dict(depth=34)),
}


def make_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
  """The PyTorch network ``name`` (a key of :data:`ARCHS`, the names of
  :data:`dale_jax.models.MODELS`); ``kwargs`` as in the Flax models (``width=8``,
  ``stage_sizes``, ``depth``, ``widen_factor``), ``sub_block1`` for a WideResNet.

  Its ``state_dict`` keys are those :mod:`dale_jax.models.torch_weights` reads and
  writes. ``mnist_cnn`` returns ``log_softmax`` (advbench's network does), the others
  logits.
  """
  validation.one_of("model", name, list(ARCHS))
  cls, fixed = ARCHS[name]
  return cls(num_classes, **{**fixed, **kwargs})


@torch.no_grad()
def load_state_dict(name: str, state_dict: Mapping[str, Any], num_classes: int,
                    normalize: tuple | None = None) -> nn.Module:
  """The eval-mode PyTorch network ``name`` holding ``state_dict``, loaded strictly.

  Args:
    name: a key of :data:`ARCHS`.
    state_dict: a PyTorch ``state_dict`` in the names of
      :mod:`dale_jax.models.torch_weights`; the wrapper prefixes (``module.``,
      ``_orig_mod.``) are stripped, and a WideResNet is built with ``sub_block1`` when
      the ``state_dict`` holds TRADES' unused block.
    num_classes: logits.
    normalize: ``(mean, std)`` per channel, applied inside the network
      (:class:`Normalized`), or ``None``.
  """
  from dale_jax.models import torch_weights  # pylint: disable=import-outside-toplevel
  tensors = torch_weights.strip_prefixes(state_dict)
  kwargs = {}
  if ARCHS.get(name, (None,))[0] is WideResNet:
    kwargs["sub_block1"] = any(k.startswith("sub_block1.") for k in tensors)
  net = make_model(name, num_classes, **kwargs)
  net.load_state_dict(tensors, strict=True)
  if normalize is not None:
    net = Normalized(net, *normalize)
  return net.eval()


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
# Noise: every random draw of a step, by kind, so that a test can replay another
# implementation's draws.


Noise = Callable[..., torch.Tensor]

# The law of each kind of draw, and where it is used. ``draw`` numbers the ``M``
# draws of a multi-draw algorithm (CVaR, ERM_DataAug), ``step`` the sampler's step.
NOISE_KINDS = {
    "start": "normal",  # the Gaussian start ``x + init_std N(0, I)``
    "gaussian": "normal",  # LMC-Gaussian's ``c N(0, I)`` added after the sign step
    "laplace": "laplace",  # LMC-Laplacian's ``Laplace(0, 1)`` added inside the sign
    "smoothing": "normal",  # SmoothAdv's ``(num_samples, *x.shape)`` draws of a step
    "uniform": "uniform",  # ``U[0, 1)`` of x's shape: one uniform perturbation
    "chain_start": "uniform",  # ``U[0, 1)`` of x's shape: the start of the MH chains
    "proposal": "laplace",  # MH's random-walk proposal at step ``step``
    "accept": "uniform",  # ``()``: MH's acceptance draw at step ``step``
}


def torch_noise(device: torch.device | str | None = None) -> Noise:
  """``noise(kind, shape, *, draw=0, step=0)``: fresh torch draws, as advbench makes them.

  Standard normal, ``Laplace(0, 1)`` or ``U[0, 1)`` by :data:`NOISE_KINDS`, NCHW
  where image-shaped; ``draw`` and ``step`` say where the draw is used (another
  implementation's draws are keyed by them) and are ignored here.
  """
  laplace = Laplace(torch.tensor(0.0, device=device), torch.tensor(1.0, device=device))

  def noise(kind: str, shape, *, draw: int = 0, step: int = 0) -> torch.Tensor:
    del draw, step
    law = NOISE_KINDS[kind]
    if law == "normal":
      return torch.randn(shape, device=device)
    if law == "laplace":
      return laplace.sample(shape)
    return torch.rand(shape, device=device)

  return noise


# ----------------------------------------------------------------------------
# Potentials.


def log_one_minus_p(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  """``log(1 - p_y) = logsumexp_{j != y} z_j - logsumexp_j z_j`` per example."""
  is_label = F.one_hot(y, out.shape[-1]).bool()
  others = out.masked_fill(is_label, float("-inf"))
  return torch.logsumexp(others, -1) - torch.logsumexp(out, -1)


def trades_kl(clean_out: torch.Tensor, adv_out: torch.Tensor) -> torch.Tensor:
  """advbench's ``KLDivLoss(batchmean)(log_softmax(f(x')), softmax(f(x)))``."""
  return F.kl_div(F.log_softmax(adv_out, dim=1), F.softmax(clean_out, dim=1),
                  reduction="batchmean")


# ----------------------------------------------------------------------------
# Samplers (advbench's attacks.py, Linf): fn(model, x, y, noise, **hparams) -> x'.


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
  x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
  return torch.clamp(x_adv, 0.0, 1.0)


def _input_grad(loss_of: Callable[[torch.Tensor], torch.Tensor],
                x_adv: torch.Tensor) -> torch.Tensor:
  x_adv = x_adv.detach().requires_grad_(True)
  grad, = torch.autograd.grad(loss_of(x_adv), [x_adv])
  return grad.detach()


def pgd_linf(model, x, y, noise, *, eps, step_size, steps):
  """``PGD_Linf``: from ``x``, ``x' <- P(x' + eta sign(grad mean CE))``."""
  del noise
  adv = x
  for _ in range(steps):
    grad = _input_grad(lambda z: F.cross_entropy(model(z), y), adv)
    adv = _project(adv + step_size * torch.sign(grad), x, eps)
  return adv


def fgsm_linf(model, x, y, noise, *, eps):
  """``FGSM_Linf``: ``clip(x + eps sign(grad mean CE), 0, 1)``."""
  del noise
  grad = _input_grad(lambda z: F.cross_entropy(model(z), y), x)
  return torch.clamp(x + eps * torch.sign(grad), 0.0, 1.0)


def lmc_gaussian_linf(model, x, y, noise, *, eps, step_size, steps, noise_scale, init_std):
  """``LMC_Gaussian_Linf``: ``x' <- P(x' + eta sign(grad U) + c N(0, I))``, ``U`` the
  batch mean of ``log(1 - p_y)``, from ``P(x + init_std N(0, I))``."""
  adv = _project(x + init_std * noise("start", x.shape), x, eps)
  for i in range(steps):
    grad = _input_grad(lambda z: log_one_minus_p(model(z), y).mean(), adv)
    adv = adv + step_size * torch.sign(grad)
    if noise_scale:
      adv = adv + noise_scale * noise("gaussian", x.shape, step=i)
    adv = _project(adv, x, eps)
  return adv


def lmc_laplacian_linf(model, x, y, noise, *, eps, step_size, steps, noise_scale, init_std,
                       mean_over=None):
  """``LMC_Laplacian_Linf``: ``x' <- P(x' + eta sign(grad U + c xi))``, ``xi ~ Laplace(0,
  1)``, ``U`` the batch mean of ``log(1 - p_y)``, from ``P(x + init_std N(0, I))``.

  The noise is relative to the gradient of the batch *mean*, as advbench computes it
  (dale_jax ascends the sum and scales ``c`` by ``mean_over`` instead).
  """
  validation.require(mean_over is None or mean_over == x.shape[0], "sampler.mean_over",
                     f"None or the batch size {x.shape[0]} (the torch reference averages over "
                     "its batch as advbench does)", mean_over)
  adv = _project(x + init_std * noise("start", x.shape), x, eps)
  for i in range(steps):
    grad = _input_grad(lambda z: log_one_minus_p(model(z), y).mean(), adv)
    xi = noise("laplace", grad.shape, step=i)
    adv = _project(adv + step_size * torch.sign(grad + noise_scale * xi), x, eps)
  return adv


def trades_linf(model, x, y, noise, *, eps, step_size, steps, init_std):
  """``TRADES_Linf``: ``x' <- P(x' + eta sign(grad KL(p(x) || p(x'))))`` from
  ``P(x + init_std N(0, I))``, ``p(x)`` computed once."""
  del y
  with torch.no_grad():
    clean = model(x)
  adv = _project(x + init_std * noise("start", x.shape), x, eps)
  for _ in range(steps):
    grad = _input_grad(lambda z: trades_kl(clean, model(z)), adv)
    adv = _project(adv + step_size * torch.sign(grad), x, eps)
  return adv


def smooth_adv_linf(model, x, y, noise, *, eps, step_size, steps, sigma, num_samples,
                    from_clean=True):
  """``SmoothAdv``: sign steps on ``-mean_i log (1/n) sum_k softmax_y(f(x' + sigma xi_k))``;
  each step from ``x`` (``from_clean``, advbench) or from the last ``x'``."""
  rows = torch.arange(x.shape[0], device=x.device)
  adv = x
  for i in range(steps):
    deltas = sigma * noise("smoothing", (num_samples,) + tuple(x.shape), step=i)

    def loss(z):
      # advbench forwards the k noisy copies one at a time; in eval mode one forward
      # of all of them computes the same.
      noisy = (z[None] + deltas).flatten(0, 1)
      p = F.softmax(model(noisy), dim=1).reshape(num_samples, x.shape[0], -1)
      total = p[:, rows, y].sum(0)
      return -torch.log(total / num_samples).mean()

    grad = _input_grad(loss, adv)
    adv = _project((x if from_clean else adv) + step_size * torch.sign(grad), x, eps)
  return adv


def uniform_linf(model, x, y, noise, *, eps):
  """advbench's ``sample_deltas``: ``clip(x + 2 eps U[0, 1) - eps, 0, 1)``."""
  del model, y
  return torch.clamp(x + (2 * eps * noise("uniform", x.shape) - eps), 0.0, 1.0)


def worst_of_k_linf(model, x, y, noise, *, eps, k):
  """The advbench fork's ``Worst_Of_K`` (``batched=0``): of ``k`` uniform draws
  (:func:`uniform_linf`, candidate ``j`` drawn as ``noise("uniform", shape, step=j)``;
  the fork draws its sets' ``delta_init``), the one whose batch-mean cross-entropy is
  highest, the earlier one on a tie."""
  with torch.no_grad():
    worst_loss = -1
    for j in range(k):
      adv_imgs = uniform_linf(model, x, y, functools.partial(noise, step=j), eps=eps)
      adv_loss = F.cross_entropy(model(adv_imgs), y)
      # ``if adv_loss > worst_loss`` in the fork; a select keeps the step free of syncs.
      better = adv_loss > worst_loss
      worst_loss = torch.where(better, adv_loss, worst_loss)
      worst = adv_imgs if j == 0 else torch.where(better, adv_imgs, worst)
  return worst


def metropolis_hastings_linf(model, x, y, noise, *, eps, steps, proposal_std, temperature=1.0):
  """The advbench fork's ``MH`` on the Linf ball: one chain for the whole batch on the
  batch-mean cross-entropy ``L``.

  Each step proposes ``delta' = clamp_delta(delta + eps * Laplace(0, s eps))``
  (``s = proposal_std``, the fork's ``mh_dale_scale``; ``clamp_delta`` projects onto
  the ball and the box) and accepts it for every example when ``u < min(1, (L(delta')
  / L(delta))^(1/T))``, ``u ~ U[0, 1)`` (the fork's ``torch.bernoulli``; it has no
  temperature, ``T = 1``). The chain starts at a uniform draw ``clip(x + 2 eps U -
  eps, 0, 1) - x`` (the fork's Linf ``MH`` cannot be built; dale_jax's start).
  """
  with torch.no_grad():
    delta = torch.clamp(x + (2 * eps * noise("chain_start", x.shape) - eps), 0.0, 1.0) - x
    last_loss = F.cross_entropy(model(x + delta), y)
    ones = torch.ones_like(last_loss)
    for i in range(steps):
      proposal = delta + (proposal_std * eps) * noise("proposal", x.shape, step=i) * eps
      proposal = _project(x + proposal, x, eps) - x
      proposal_loss = F.cross_entropy(model(x + proposal), y)
      acceptance_ratio = torch.minimum((proposal_loss / last_loss) ** (1.0 / temperature), ones)
      accepted = noise("accept", (), step=i) < acceptance_ratio
      delta = torch.where(accepted, proposal, delta)
      last_loss = torch.where(accepted, proposal_loss, last_loss)
  return x + delta


# name -> (function, {field: the one value the reference implements}, fields passed on).
_SAMPLERS = {
    "pgd": (pgd_linf, dict(random_start=False, restarts=1, potential="cross_entropy"),
            ("eps", "step_size", "steps")),
    "fgsm": (fgsm_linf, dict(random_start=False, step_size=None), ("eps",)),
    "langevin_gaussian": (lmc_gaussian_linf, dict(start="gaussian", potential="log_one_minus_p"),
                          ("eps", "step_size", "steps", "noise_scale", "init_std")),
    "langevin_laplacian": (lmc_laplacian_linf, dict(potential="log_one_minus_p"),
                           ("eps", "step_size", "steps", "noise_scale", "init_std", "mean_over")),
    "trades_kl": (trades_linf, {}, ("eps", "step_size", "steps", "init_std")),
    "smooth_adv": (smooth_adv_linf, {},
                   ("eps", "step_size", "steps", "sigma", "num_samples", "from_clean")),
    "uniform": (uniform_linf, {}, ("eps",)),
    "worst_of_k": (worst_of_k_linf, dict(potential="cross_entropy", select="batch"), ("eps", "k")),
    "metropolis_hastings": (
        metropolis_hastings_linf,
        dict(proposal="laplace", radius_scaled=True, acceptance="loss_ratio",
             potential="cross_entropy", per_example=False, outside="project"),
        ("eps", "steps", "proposal_std", "temperature")),
}


def make_sampler(config: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
  """``sample(model, x, y, noise) -> x'`` from a dale_jax ``sampler`` section (Linf).

  The model is in ``eval()`` mode while sampling and back in ``train()`` mode
  afterwards, as in advbench; no gradient flows out of ``x'``.
  """
  config = dict(config)
  name = config.pop("name", None)
  norm = config.pop("norm", "linf")
  validation.require(norm == "linf", "sampler.norm",
                     "'linf' (the only norm the torch reference implements)", norm)
  validation.require(name in _SAMPLERS, "sampler.name",
                     f"one of {sorted(_SAMPLERS)} (those the torch reference implements)", name)
  fn, required, fields = _SAMPLERS[name]
  unknown = sorted(set(config) - set(fields) - set(required))
  if unknown:
    raise validation.InvalidArgument(f"sampler.{unknown[0]}",
                                     rest="is not implemented by the torch reference")
  # A field the section leaves out has dale_jax's default.
  from dale_jax import samplers  # pylint: disable=import-outside-toplevel
  parameters = inspect.signature(samplers.SAMPLERS[name]).parameters.values()
  defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
  config = {**{f: defaults[f] for f in (*fields, *required) if f in defaults}, **config}
  for field, value in required.items():
    validation.require(config[field] == value, f"sampler.{field}",
                       f"{value!r} for {name!r} (all the torch reference implements)",
                       config[field])
  kwargs = {f: config[f] for f in fields if f in config}

  def sample(model, x, y, noise):
    model.eval()
    try:
      return fn(model, x.detach(), y, noise, **kwargs).detach()
    finally:
      model.train()

  return sample


# ----------------------------------------------------------------------------
# Losses (advbench's algorithms.py): loss(cfg, clean, adv, y, nu) -> (loss, constraint).
# ``clean`` is the model's output on x, ``adv`` its outputs on the M draws, (M, B, classes).


def _ce(out, y):
  return F.cross_entropy(out, y)


def _erm(cfg, clean, adv, y, nu):
  return _ce(clean, y), None


def _adversarial_ce(cfg, clean, adv, y, nu):
  # One draw: advbench's PGD, FGSM, RandSmoothing. M draws: ERM_DataAug's mean over
  # them (advbench averages the *clean* CE M times).
  return torch.stack([_ce(a, y) for a in adv]).mean(), None


def _trades(cfg, clean, adv, y, nu):
  ce = _ce(clean if cfg.get("ce_on", "clean") == "clean" else adv[0], y)
  return ce + cfg["beta"] * trades_kl(clean, adv[0]), None


def _logit_pairing(ce_on):
  def loss(cfg, clean, adv, y, nu):
    # ``torch.norm(f(x') - f(x), dim=1).mean()`` of the network's outputs: advbench's
    # MNIST network returns log_softmax (pair_on="log_softmax"), the ResNet logits.
    pair = (lambda o: F.log_softmax(o, dim=1)) if cfg.get("pair_on") == "log_softmax" else (
        lambda o: o)
    pairing = torch.norm(pair(adv[0]) - pair(clean), dim=1).mean()
    ce = _ce(adv[0] if ce_on == "adv" else clean, y)
    return ce + cfg.get("weight", 1.0) * pairing, None
  return loss


def _mart(cfg, clean, adv, y, nu):
  adv_output = adv[0]
  adv_probs = F.softmax(adv_output, dim=1)
  tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
  new_label = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
  loss_adv = F.cross_entropy(adv_output, y) + F.nll_loss(
      torch.log(1.0001 - adv_probs + 1e-12), new_label)
  nat_probs = F.softmax(clean, dim=1)
  true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
  kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none")
  loss_robust = (1.0 / clean.shape[0]) * torch.sum(torch.sum(kl, dim=1) * (1.0000001 - true_probs))
  return loss_adv + cfg["beta"] * loss_robust, None


def _term(cfg, clean, adv, y, nu):
  t = cfg["t"]
  loss = F.cross_entropy(clean, y, reduction="none")
  return torch.log(torch.exp(t * loss).mean() + 1e-6) / t, None


def _cvar(method, primal_dual=False):
  def loss(cfg, clean, adv, y, nu):
    beta, m = cfg["beta"], adv.shape[0]
    curr = [F.cross_entropy(a, y, reduction="none") for a in adv]
    # t per example from 1, ``n_steps`` (sub)gradient steps on the M draws' losses
    # (advbench redraws them at every t-step and divides the step by the batch size).
    ts = torch.ones_like(curr[0])
    # CVaR_SGD(_PD) take the loss inside the loop, before the last update; Autograd after.
    updates = cfg["n_steps"] - 1 if method == "subgradient" else cfg["n_steps"]
    for _ in range(updates):
      if method == "subgradient":
        indicator_avg = sum(torch.where(c.detach() > ts, 1.0, 0.0) for c in curr) / float(m)
        grad_ts = 1 - (1 / beta) * indicator_avg
      else:  # The gradient of the batch *sum* of the brackets: each t_i its own problem.
        ts = ts.detach().requires_grad_(True)
        brackets = ts + sum(F.relu(c.detach() - ts) for c in curr) / (float(m) * beta)
        grad_ts, = torch.autograd.grad(brackets.sum(), [ts])
      ts = (ts - cfg["t_step_size"] * grad_ts).detach()
    cvar_loss = (ts + sum(F.relu(c - ts) for c in curr) / (float(m) * beta)).mean()
    if not primal_dual:
      return cvar_loss, None
    plain = sum(c.mean() for c in curr) / float(m)
    constraint = plain if cfg.get("constraint", "draws") == "draws" else _ce(clean, y)
    return cvar_loss + nu * constraint, constraint
  return loss


def _dale(objective="robust", robust="ce"):
  def loss(cfg, clean, adv, y, nu):
    clean_loss = _ce(clean, y)
    robust_loss = _ce(adv[0], y) if robust == "ce" else trades_kl(clean, adv[0])
    weight = cfg["nu_fixed"] if nu is None else nu
    if objective == "robust":
      return robust_loss + weight * clean_loss, clean_loss
    return clean_loss + weight * robust_loss, robust_loss
  return loss


# name -> (loss, needs the clean outputs).
_LOSSES = {
    "ERM": (_erm, True),
    "ERM_DataAug": (_adversarial_ce, False),
    "FGSM": (_adversarial_ce, False),
    "PGD": (_adversarial_ce, False),
    "RandSmoothing": (_adversarial_ce, False),
    "TRADES": (_trades, True),
    "ALP": (_logit_pairing("adv"), True),
    "CLP": (_logit_pairing("clean"), True),
    "MART": (_mart, True),
    "TERM": (_term, True),
    "CVaR_SGD": (_cvar("subgradient"), False),
    "CVaR_SGD_Autograd": (_cvar("autograd"), False),
    "CVaR_SGD_PD": (_cvar("subgradient", primal_dual=True), None),  # None: loss.constraint
    "Gaussian_DALE": (_dale(), True),
    "Laplacian_DALE": (_dale(), True),
    "Gaussian_DALE_PD": (_dale(), True),
    "Gaussian_DALE_PD_Reverse": (_dale(objective="clean"), True),
    "KL_DALE_PD": (_dale(robust="kl"), True),
    "DALE": (_dale(), True),
    "Worst_Of_K": (_adversarial_ce, False),
    "MH_DALE_PD": (_dale(), True),
    "MH_DALE_PD_Reverse": (_dale(objective="clean"), True),
}
ALGORITHMS = tuple(_LOSSES)


# ----------------------------------------------------------------------------
# The training step.


class TrainStep:
  """``step(x, y, noise=None) -> {"Loss", "x_adv"}``: one training step of
  ``config.algorithm``, in place.

  Args:
    model: a torch model in ``train()`` mode (``torch.compile``-d or not).
    config: a dale_jax config (``algorithm``, ``sampler``, ``draws``, ``loss``,
      ``dual``, ``optimizer``, ``batch_size``); the learning rate is constant.
    steps_per_epoch: resolves ``dual.every="epoch"`` (the dual variable then moves
      once every ``steps_per_epoch`` calls by the sum of their per-step moves).
  """

  def __init__(self, model: nn.Module, config, steps_per_epoch: int = 1):
    algorithm = config.algorithm
    validation.require(algorithm in _LOSSES, "algorithm",
                       f"one of {ALGORITHMS} for the torch reference", algorithm)
    self.model = model
    self.algorithm = algorithm
    o = config.optimizer
    self.optimizer = torch.optim.SGD(model.parameters(), lr=o.learning_rate,
                                     momentum=o.momentum, weight_decay=o.weight_decay,
                                     nesterov=o.nesterov)
    self.loss_config = config.loss.to_dict()
    self.loss_fn, self.needs_clean = _LOSSES[algorithm]
    if self.needs_clean is None:
      self.needs_clean = self.loss_config.get("constraint", "draws") == "clean"
    section = config.sampler.to_dict()
    if section.get("mean_over", 0) is None:
      section["mean_over"] = config.batch_size
    self.sampler = make_sampler(section) if section else None
    self.draws = int(config.draws) if section else 0
    validation.require(self.draws <= 1 or section["name"] == "uniform", "draws",
                       f"1 with sampler {section.get('name')!r} (the torch reference draws several "
                       "perturbations per example with the uniform sampler only)", self.draws)
    dual = config.dual.to_dict()
    device = next(model.parameters()).device
    self.nu = torch.tensor(float(dual.get("init_value", 1.0)), device=device) if dual else None
    self.dual_step = float(dual.get("step_size", 0.0)) if dual else 0.0
    self.margin = float(dual.get("margin", 0.0)) if dual else 0.0
    self.dual_every = steps_per_epoch if dual.get("every", "step") == "epoch" else 1
    self._dual_moves, self._dual_count = 0.0, 0

  def perturb(self, x: torch.Tensor, y: torch.Tensor, noise: Noise) -> torch.Tensor | None:
    """The sampler's ``draws`` perturbations of ``x``, ``(draws, batch, C, H, W)``
    (``None`` without a sampler); draw ``j`` asks ``noise`` with ``draw=j``."""
    if self.sampler is None:
      return None
    return torch.stack([self.sampler(self.model, x, y, functools.partial(noise, draw=j))
                        for j in range(self.draws)])

  def __call__(self, x: torch.Tensor, y: torch.Tensor,
               noise: Noise | None = None) -> dict[str, torch.Tensor | None]:
    """One step on ``(x, y)``; ``noise`` (default :func:`torch_noise`) makes every draw.

    Returns the loss and the perturbations the step trained on, ``(draws, batch, C,
    H, W)`` (``None`` without a sampler).
    """
    x_adv = self.perturb(x, y, noise or torch_noise(x.device))
    self.optimizer.zero_grad(set_to_none=True)
    clean = self.model(x) if self.needs_clean else None
    adv = None
    if x_adv is not None:
      adv = self.model(x_adv.flatten(0, 1))
      adv = adv.reshape(x_adv.shape[:2] + adv.shape[1:])
    loss, constraint = self.loss_fn(self.loss_config, clean, adv, y, self.nu)
    loss.backward()
    self.optimizer.step()
    if self.nu is not None:
      # Kept on the device: no host synchronisation inside the step.
      self._dual_moves = self._dual_moves + (constraint.detach() - self.margin)
      self._dual_count += 1
      if self._dual_count == self.dual_every:
        self.nu = torch.clamp(self.nu + self.dual_step * self._dual_moves, min=0.0)
        self._dual_moves, self._dual_count = 0.0, 0
    return {"Loss": loss.detach(), "x_adv": x_adv}
