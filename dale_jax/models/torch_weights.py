"""PyTorch ``state_dict``s to and from dale_jax variables, in the robustness codebases' names.

A network trained with PyTorch is evaluated by dale_jax, and a dale_jax run's weights
load into the PyTorch definition of the same network::

  from dale_jax.models import get_model, torch_weights

  state_dict = torch_weights.read_checkpoint("model.pt")        # torch.load, weights only
  variables = torch_weights.from_torch(state_dict, "wrn34_10")  # {"params", "batch_stats"}
  logits = get_model("wrn34_10", 10).apply(variables, x, train=False)   # x: NHWC

  torch_weights.save_torch(variables, "wrn34_10", "back.pt")    # the same keys again

From the command line, ``dale-eval --torch_checkpoint=model.pt --arch=wrn34_10
--normalize=cifar10 --dataset=cifar10 --output_dir=out`` evaluates a checkpoint, and
``python -m dale_jax.cli.export_torch --workdir=runs/x --out=model.pt`` writes a
dale-train run's weights as a ``state_dict``.

Architectures (:data:`ARCHS`, the names of :data:`dale_jax.models.MODELS`) and the
PyTorch code whose parameter names each one uses:

* ``mnist_cnn``: advbench's MNIST network: ``conv1``, ``conv2``, ``fc1``, ``fc2``.
* ``resnet18``: kuangliu/pytorch-cifar's ``ResNet18`` (advbench's CIFAR-10 model,
  RobustBench's ``ResNet``): ``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``,
  ``layer1.0.conv2``, ``layer1.0.bn2``, ``layer2.0.shortcut.0`` (the 1x1 conv) and
  ``layer2.0.shortcut.1`` (its BatchNorm), ..., ``linear``.
* ``preact_resnet18``: Wong et al.'s and RobustBench's ``PreActResNet18``: ``conv1``,
  ``layer1.0.bn1``, ``layer1.0.conv1``, ``layer1.0.bn2``, ``layer1.0.conv2``,
  ``layer2.0.shortcut.0``, ..., ``bn``, ``linear``.
* ``wrn28_10``, ``wrn34_10``: TRADES' and MART's ``wideresnet.py``, RobustBench's
  ``WideResNet``: ``conv1``, ``block1.layer.0.bn1``, ``block1.layer.0.conv1``,
  ``block1.layer.0.bn2``, ``block1.layer.0.conv2``, ``block1.layer.0.convShortcut``,
  ..., ``bn1``, ``fc``.

Reading a ``state_dict`` (:func:`from_torch`):

* the ``module.`` prefixes of ``DataParallel`` (RobustBench's checkpoints have them) and
  ``_orig_mod.`` of ``torch.compile`` are stripped;
* BatchNorm's ``num_batches_tracked`` is ignored (dale_jax's BatchNorm has a fixed
  momentum and never reads it), and so is ``sub_block1``, a block that TRADES' and
  MART's ``WideResNet`` build and never call;
* every other key must be the architecture's, with its shape, or a
  :class:`WeightsMismatch` names the first missing, unexpected or misshapen keys;
* the number of classes is read from the last layer.

Layouts: conv weights are OIHW in torch and HWIO in Flax, linear weights ``(out, in)``
and ``(in, out)``; ``fc1`` of the MNIST network also reorders its inputs (torch
flattens C, H, W, the Flax model H, W, C). Values are float32, and every conversion is
a transpose, so torch -> dale_jax -> torch gives bitwise the same tensors under the
same keys (``num_batches_tracked`` comes back as 0).

Input normalisation is not a weight: :func:`dale_jax.models.normalized` wraps the
model in it. torch is imported only inside the functions that make or read torch
tensors (``pip install dale_jax[torch]``); reading a ``state_dict`` of NumPy arrays
needs no torch.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from dale_jax import validation
from dale_jax.models import MODELS, get_model, init_variables
from dale_jax.models.wide_resnet import WideResNet

ARCHS = tuple(MODELS)
# The WideResNets, whose names are TRADES' (and which may carry its `sub_block1`).
WIDE_ARCHS = tuple(a for a in ARCHS if isinstance(get_model(a, 10), WideResNet))

# The one input shape each architecture's PyTorch original computes the same function
# on: WRN's avg_pool2d(out, 8), the ResNets' avg_pool2d(out, 4) and the MNIST network's
# fc1 fix the image size.
_INPUT_SHAPES = {"mnist_cnn": (28, 28, 1)}
_CIFAR_SHAPE = (32, 32, 3)

# Prefixes that wrappers add to every key: DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Keys of the state_dicts that no forward reads: TRADES'/MART's WRN builds `sub_block1`.
_UNUSED_WRN_BLOCK = "sub_block1."

# Where a state_dict sits in a training checkpoint, in the order they are tried.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")

_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "bias"): "bias",
               ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}

# The MNIST network's fc1 input: conv2's 64 channels on a 12 x 12 map.
_MNIST_FC1_MAP = (12, 12, 64)


class WeightsMismatch(validation.BadInput, ValueError):
  """A ``state_dict`` (or a variables tree) that is not the architecture's."""


class CheckpointError(validation.BadInput, ValueError):
  """A file that holds no PyTorch ``state_dict``, or no PyTorch to read it."""


# ----------------------------------------------------------------------------
# One tensor: Flax layout <-> torch layout (NumPy in, NumPy out).


def _conv_to_torch_layout(kernel: np.ndarray) -> np.ndarray:
  return kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW


def _conv_to_flax_layout(weight: np.ndarray) -> np.ndarray:
  return weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _dense_to_other_layout(kernel: np.ndarray) -> np.ndarray:
  return kernel.T  # (in, out) <-> (out, in)


def _mnist_fc1_to_torch_layout(kernel: np.ndarray) -> np.ndarray:
  # Flax rows are (h, w, c); torch's flatten of NCHW is (c, h, w).
  k = kernel.reshape(*_MNIST_FC1_MAP, -1)
  return k.transpose(3, 2, 0, 1).reshape(k.shape[-1], -1)


def _mnist_fc1_to_flax_layout(weight: np.ndarray) -> np.ndarray:
  h, w, c = _MNIST_FC1_MAP
  return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


_TO_TORCH = {"conv": _conv_to_torch_layout, "dense": _dense_to_other_layout,
             "mnist_fc1": _mnist_fc1_to_torch_layout, "vector": lambda v: v}
_TO_FLAX = {"conv": _conv_to_flax_layout, "dense": _dense_to_other_layout,
            "mnist_fc1": _mnist_fc1_to_flax_layout, "vector": lambda v: v}


def _numpy(value: Any) -> np.ndarray:
  """A float32 NumPy copy of a torch tensor (any device, any float dtype) or an array."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().float().numpy()  # NumPy has no bfloat16
  return np.array(value, np.float32)


def _float32(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(array, np.float32)


def conv_to_torch(kernel) -> Any:
  """An HWIO Flax conv kernel as a contiguous float32 OIHW ``torch.Tensor``."""
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(_float32(_conv_to_torch_layout(_numpy(kernel))))


def conv_to_flax(weight) -> np.ndarray:
  """A torch OIHW conv weight (tensor or array) as a float32 HWIO NumPy kernel."""
  return _float32(_conv_to_flax_layout(_numpy(weight)))


def dense_to_torch(kernel) -> Any:
  """An ``(in, out)`` Flax dense kernel as a float32 ``(out, in)`` ``torch.Tensor``."""
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(_float32(_dense_to_other_layout(_numpy(kernel))))


def mnist_fc1_to_torch(kernel) -> Any:
  """The MNIST network's ``fc1`` kernel, rows in (h, w, c) order, as torch's weight
  (inputs in (c, h, w) order, the flatten of an NCHW map)."""
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(_float32(_mnist_fc1_to_torch_layout(_numpy(kernel))))


def mnist_fc1_to_flax(weight) -> np.ndarray:
  """The inverse of :func:`mnist_fc1_to_torch`, as a NumPy kernel."""
  return _float32(_mnist_fc1_to_flax_layout(_numpy(weight)))


# ----------------------------------------------------------------------------
# The whole network: which Flax leaf is which torch key.


class Entry(NamedTuple):
  """One tensor of an architecture: where it is in Flax and in torch."""
  collection: str  # "params" or "batch_stats"
  path: tuple[str, ...]  # the Flax path inside the collection, leaf name last
  key: str  # the torch state_dict key
  kind: str  # the layout change: "conv", "dense", "mnist_fc1" or "vector"
  shape: tuple[int, ...]  # the Flax shape


def _check_arch(arch: str) -> None:
  validation.one_of("arch", arch, ARCHS)


def _is_wide(arch: str) -> bool:
  return arch in WIDE_ARCHS


def input_shape(arch: str) -> tuple[int, int, int]:
  """``(H, W, C)`` of the images that ``arch``'s PyTorch original is defined on."""
  _check_arch(arch)
  return _INPUT_SHAPES.get(arch, _CIFAR_SHAPE)


def _torch_module(path: tuple[str, ...], wide: bool) -> str:
  """The torch module name of the Flax module at ``path`` (see the module docstring)."""
  names = []
  for depth, name in enumerate(path):
    stage = re.fullmatch(r"(layer|block)(\d+)_(\d+)", name)
    if stage:
      kind, i, j = stage.groups()
      names.append(f"{kind}{i}.layer.{j}" if wide else f"{kind}{i}.{j}")
    elif name == "shortcut_conv":
      names.append("convShortcut" if wide else "shortcut.0")
    elif name == "shortcut_bn":
      names.append("shortcut.1")
    elif wide and depth == 0 and name == "bn":
      names.append("bn1")  # TRADES' final BatchNorm
    else:
      names.append(name)
  return ".".join(names)


@functools.lru_cache(maxsize=16)
def layout(arch: str, num_classes: int) -> tuple[Entry, ...]:
  """Every tensor of ``arch`` with ``num_classes`` logits: its Flax path and torch key.

  Args:
    arch: one of :data:`ARCHS`.
    num_classes: number of logits.

  Returns:
    The :class:`Entry` of every parameter and batch statistic, in the (sorted) order
    of the Flax variables; shapes only, nothing is initialised.
  """
  _check_arch(arch)
  model = get_model(arch, num_classes)
  shapes = jax.eval_shape(
      lambda: init_variables(model, jax.random.key(0), input_shape(arch)))
  wide = _is_wide(arch)
  entries = []
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
    for keys, leaf in flat:
      path = tuple(k.key for k in keys)
      key = f"{_torch_module(path[:-1], wide)}.{_LEAF_NAMES[collection, path[-1]]}"
      kind = {4: "conv", 2: "dense"}.get(len(leaf.shape), "vector")
      if arch == "mnist_cnn" and path[0] == "fc1" and kind == "dense":
        kind = "mnist_fc1"
      entries.append(Entry(collection, path, key, kind, tuple(leaf.shape)))
  return tuple(entries)


def _torch_shape(entry: Entry) -> tuple[int, ...]:
  return tuple(_TO_TORCH[entry.kind](np.empty(entry.shape, np.bool_)).shape)


def _head(arch: str) -> Entry:
  """The kernel of the last layer, the one dense layer with ``num_classes`` outputs."""
  head, = [e for e in layout(arch, 10) if e.kind == "dense" and e.shape[-1] == 10]
  return head


def _batch_norms(entries) -> list[str]:
  """The torch names of the BatchNorm modules, in order."""
  return list(dict.fromkeys(e.key.rsplit(".", 1)[0] for e in entries
                            if e.collection == "batch_stats"))


def _listed(keys: list[str], most: int = 3) -> str:
  more = f", ... ({len(keys)} in all)" if len(keys) > most else ""
  return ", ".join(keys[:most]) + more


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """``state_dict`` without the ``module.`` / ``_orig_mod.`` prefixes of wrappers."""
  out = {}
  for key, value in state_dict.items():
    while key.startswith(_WRAPPER_PREFIXES):
      key = key.split(".", 1)[1]
    out[key] = value
  return out


def from_torch(state_dict: Mapping[str, Any], arch: str,
               num_classes: int | None = None) -> dict[str, Any]:
  """dale_jax variables of ``arch`` from a PyTorch ``state_dict``.

  Args:
    state_dict: key -> ``torch.Tensor`` (or NumPy array), as ``model.state_dict()``
      returns it; wrapper prefixes are stripped (see the module docstring).
    arch: one of :data:`ARCHS`; the keys are those of its PyTorch definition.
    num_classes: number of logits; ``None`` reads it from the last layer.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` of float32 NumPy arrays, for
    ``get_model(arch, num_classes).apply(variables, x, train=False)``.

  Raises:
    validation.InvalidArgument: unknown ``arch`` (the message lists :data:`ARCHS`).
    WeightsMismatch: keys missing or unexpected, or a tensor of another shape; the
      message names the first of them.
  """
  _check_arch(arch)
  tensors = strip_prefixes(state_dict)
  if num_classes is None:
    head = tensors.get(_head(arch).key)
    num_classes = int(head.shape[0]) if head is not None and len(head.shape) == 2 else 10
  entries = layout(arch, num_classes)
  _check_keys(tensors, entries, arch)
  variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for e in entries:
    tree = variables[e.collection]
    for name in e.path[:-1]:
      tree = tree.setdefault(name, {})
    tree[e.path[-1]] = _float32(_TO_FLAX[e.kind](_numpy(tensors[e.key])))
  return variables


def _check_keys(tensors: Mapping[str, Any], entries, arch: str) -> None:
  expected = {e.key: e for e in entries}
  ignored = {f"{m}.num_batches_tracked" for m in _batch_norms(entries)}
  wide = _is_wide(arch)
  missing = [k for k in expected if k not in tensors]
  unexpected = [k for k in tensors if k not in expected and k not in ignored
                and not (wide and k.startswith(_UNUSED_WRN_BLOCK))]
  if missing or unexpected:
    parts = ([f"missing {_listed(missing)}"] if missing else []) + (
        [f"unexpected {_listed(unexpected)}"] if unexpected else [])
    raise WeightsMismatch(f"the state_dict does not match arch {arch!r} (PyTorch names as in "
                          f"dale_jax.models.torch_weights): {'; '.join(parts)}")
  for key, e in expected.items():
    got, want = tuple(tensors[key].shape), _torch_shape(e)
    if got != want:
      raise WeightsMismatch(f"the state_dict does not match arch {arch!r}: {key} has shape "
                            f"{got}, {arch} has {want} there")


def to_torch(variables: Mapping[str, Any], arch: str, *,
             sub_block1: bool = False) -> dict[str, Any]:
  """A PyTorch ``state_dict`` of ``arch`` from dale_jax variables.

  Args:
    variables: ``{"params", "batch_stats"}`` of ``get_model(arch, num_classes)``
      (NumPy or JAX arrays).
    arch: one of :data:`ARCHS`.
    sub_block1: for a WideResNet, also write ``sub_block1.*``, a copy of ``block1``,
      so that TRADES' and MART's ``WideResNet`` (which build that unused block)
      load the result with ``strict=True``. RobustBench's ``WideResNet`` builds it
      only with ``sub_block1=True``.

  Returns:
    key -> contiguous float32 ``torch.Tensor`` (``num_batches_tracked``: int64 0),
    module by module, for ``model.load_state_dict``.

  Raises:
    validation.InvalidArgument: unknown ``arch``, or ``sub_block1`` for an
      architecture without it.
    WeightsMismatch: ``variables`` lacks a tensor of ``arch``, holds another one or
      one of another shape; the message names it.
  """
  import torch  # pylint: disable=import-outside-toplevel
  entries = layout(arch, num_classes(variables, arch))
  if sub_block1 and not _is_wide(arch):
    raise validation.InvalidArgument(
        "sub_block1", rest=f"is for a WideResNet ({', '.join(WIDE_ARCHS)}), got arch {arch!r}")
  _check_leaves(variables, entries, arch)
  by_module: dict[str, dict[str, Any]] = {}
  for e in entries:
    module, name = e.key.rsplit(".", 1)
    leaf = np.asarray(_leaf(variables[e.collection], e.path), np.float32)
    by_module.setdefault(module, {})[name] = torch.from_numpy(_float32(_TO_TORCH[e.kind](leaf)))
  for module in _batch_norms(entries):
    by_module[module]["num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
  order = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
  state_dict = {f"{module}.{name}": tensors[name]
                for module, tensors in by_module.items() for name in order if name in tensors}
  if sub_block1:
    state_dict.update({_UNUSED_WRN_BLOCK + k.split(".", 1)[1]: v.clone()
                       for k, v in state_dict.items() if k.startswith("block1.")})
  return state_dict


def num_classes(variables: Mapping[str, Any], arch: str) -> int:
  """The number of logits of ``arch``'s ``variables``: the outputs of its last layer.

  Raises:
    validation.InvalidArgument: unknown ``arch``.
    WeightsMismatch: ``variables`` has no last layer of ``arch``.
  """
  _check_arch(arch)
  head = _head(arch)
  try:
    return int(np.shape(_leaf(variables["params"], head.path))[-1])
  except (KeyError, TypeError, IndexError):
    raise WeightsMismatch(f"the variables are not those of arch {arch!r}: they need "
                          f"params/{'/'.join(head.path)}, its last layer") from None


def _leaf(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _check_leaves(variables: Mapping[str, Any], entries, arch: str) -> None:
  want = {(e.collection,) + e.path: e.shape for e in entries}
  got = {}
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(dict(variables.get(collection, {})))[0]
    got.update({(collection,) + tuple(getattr(k, "key", k) for k in keys): np.shape(leaf)
                for keys, leaf in flat})
  missing = ["/".join(p) for p in want if p not in got]
  unexpected = ["/".join(p) for p in got if p not in want]
  if missing or unexpected:
    parts = ([f"missing {_listed(missing)}"] if missing else []) + (
        [f"unexpected {_listed(unexpected)}"] if unexpected else [])
    raise WeightsMismatch(f"the variables are not those of arch {arch!r}: {'; '.join(parts)}")
  for path, shape in want.items():
    if tuple(got[path]) != shape:
      raise WeightsMismatch(f"the variables are not those of arch {arch!r}: {'/'.join(path)} "
                            f"has shape {tuple(got[path])}, {arch} has {shape}")


# ----------------------------------------------------------------------------
# Files.


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f"PyTorch checkpoints need PyTorch ({e}): pip install "
                          "dale_jax[torch]") from None
  return torch


def read_checkpoint(path: str) -> dict[str, Any]:
  """The ``state_dict`` stored in ``path`` by ``torch.save``, read on the CPU.

  The file is read with ``torch.load(weights_only=True)``, which runs no code from it.
  It may hold the ``state_dict`` itself or a training checkpoint that holds it under
  one of :data:`CHECKPOINT_KEYS`.

  Args:
    path: a ``.pt`` / ``.pth`` file.

  Returns:
    key -> ``torch.Tensor``, as stored (prefixes are stripped by :func:`from_torch`).

  Raises:
    CheckpointError: no PyTorch, no such file, a file that is not a weights-only
      PyTorch file, or one that holds no ``state_dict``; one line that says which.
  """
  torch = _torch()
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} does not exist")
  try:
    stored = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # any reason it does not load
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise CheckpointError(f"{path} does not load with torch.load(weights_only=True) ({reason}); "
                          "save the weights with torch.save(model.state_dict(), path)") from None
  found = _state_dict_in(stored)
  if found is None:
    what = (f"a dict with keys {_listed([str(k) for k in stored], 5)}"
            if isinstance(stored, Mapping) else type(stored).__name__)
    raise CheckpointError(f"{path} holds no state_dict: it holds {what}; expected a dict of "
                          f"tensors, or one under {', '.join(map(repr, CHECKPOINT_KEYS))}")
  return dict(found)


def _state_dict_in(stored: Any) -> Mapping[str, Any] | None:
  if not isinstance(stored, Mapping):
    return None
  for key in CHECKPOINT_KEYS:
    if isinstance(stored.get(key), Mapping):
      return _state_dict_in(stored[key]) or None
  if stored and all(isinstance(k, str) and hasattr(v, "shape") for k, v in stored.items()):
    return stored
  return None


def save_torch(variables: Mapping[str, Any], arch: str, path: str, *,
               sub_block1: bool = False) -> dict[str, Any]:
  """Writes :func:`to_torch` of ``variables`` to ``path`` with ``torch.save``, atomically.

  Returns:
    The ``state_dict`` written.
  """
  torch = _torch()
  state_dict = to_torch(variables, arch, sub_block1=sub_block1)
  tmp = path + ".tmp"
  torch.save(state_dict, tmp)
  os.replace(tmp, path)
  return state_dict
