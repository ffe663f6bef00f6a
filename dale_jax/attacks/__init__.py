"""Attacks for evaluation: FGSM/PGD, APGD-CE/-DLR/-T, FAB/FAB-T, Square and AutoAttack.

One module per concern:

* ``pgd``, ``autopgd``, ``fab_attack``, ``square_attack``: the attack families. Each has a host
  entry point ``attack(key, logits_fn, x, y, *, norm, eps, ...) -> x_adv``, in the
  samplers' order of arguments (:mod:`dale_jax.samplers`), whose loop
  is one ``lax.scan``/``while_loop`` under ``jax.jit``, and a traceable batch
  function (``pgd_batch``, ``apgd_batch``, ``fab_batch``, ``square_batch``) that returns
  ``(x_adv, still_correct)`` for the active points of one batch.
* ``registry``: every attack by name and label, with its batch function and default
  settings: the one table of attack defaults (AutoAttack's budgets :data:`APGD_STEPS`,
  :data:`SQUARE_QUERIES`) that the configs, ``dale-eval`` and the results pages read.
* ``chain``: AutoAttack's versions (``standard``, ``plus``, ``rand``) in AutoAttack's order and
  :func:`make_attack`, an attack
  with its settings bound for use inside a jitted evaluation step.
* ``robustness``: :func:`evaluate_robustness`, the host driver of ``dale-eval``, with
  its gradient-masking warnings, and :func:`robustbench_model_info`.
* ``progress``: an evaluation's finished batches on disk, so that a killed one resumes.

``logits_fn`` is the model in eval mode; a randomised defence ``fn(x, key)`` is
passed as :class:`Randomized` (APGD then averages gradients over draws, EOT).
"""

from dale_jax.attacks._common import Randomized
from dale_jax.attacks.chain import AUTOATTACK_LABEL
from dale_jax.attacks.chain import AUTOATTACK_STANDARD
from dale_jax.attacks.chain import VERSIONS
from dale_jax.attacks.chain import version
from dale_jax.attacks.chain import autoattack
from dale_jax.attacks.chain import make_attack
from dale_jax.attacks.autopgd import apgd
from dale_jax.attacks.autopgd import checkpoints
from dale_jax.attacks.autopgd import dlr_loss
from dale_jax.attacks.autopgd import dlr_loss_targeted
from dale_jax.attacks.autopgd import halving_condition
from dale_jax.attacks.autopgd import target_classes
from dale_jax.attacks.fab_attack import fab
from dale_jax.attacks.pgd import fgsm
from dale_jax.attacks.pgd import pgd
from dale_jax.attacks.registry import APGD_STEPS
from dale_jax.attacks.registry import ATTACKS
from dale_jax.attacks.registry import FAB_STEPS
from dale_jax.attacks.registry import SQUARE_QUERIES
from dale_jax.attacks.registry import LABELS
from dale_jax.attacks.registry import budget_settings
from dale_jax.attacks.registry import canonical
from dale_jax.attacks.registry import default_settings
from dale_jax.attacks.robustness import DEFAULT_ATTACKS
from dale_jax.attacks.robustness import evaluate_robustness
from dale_jax.attacks.robustness import robustbench_model_info
from dale_jax.attacks.square_attack import margin_and_loss
from dale_jax.attacks.square_attack import square

__all__ = [
    "APGD_STEPS", "ATTACKS", "AUTOATTACK_LABEL", "FAB_STEPS", "LABELS", "SQUARE_QUERIES", "budget_settings", "canonical", "AUTOATTACK_STANDARD", "DEFAULT_ATTACKS", "Randomized",
    "VERSIONS", "apgd", "autoattack", "checkpoints", "default_settings", "dlr_loss",
    "dlr_loss_targeted", "evaluate_robustness", "fab", "fgsm", "halving_condition", "make_attack",
    "margin_and_loss", "pgd", "robustbench_model_info", "square", "target_classes", "version",
]
