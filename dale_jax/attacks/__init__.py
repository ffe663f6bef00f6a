"""Attacks for evaluation: APGD-CE, APGD-T, Square, FGSM/PGD and an AutoAttack-style ensemble.

Every attack is a pure function ``attack(logits_fn, x, y, key, *, norm, eps,
...) -> x_adv`` whose whole loop is one ``lax.scan``/``while_loop`` under
``jax.jit``; ``logits_fn`` is the model in eval mode. :func:`evaluate_robustness`
runs a list of them over a data set and reports accuracies in percent.
"""

from dale_jax.attacks.autopgd import apgd
from dale_jax.attacks.autopgd import checkpoints
from dale_jax.attacks.autopgd import dlr_loss
from dale_jax.attacks.autopgd import dlr_loss_targeted
from dale_jax.attacks.autopgd import halving_condition
from dale_jax.attacks.autopgd import target_classes
from dale_jax.attacks.ensemble import ATTACKS
from dale_jax.attacks.ensemble import AUTOATTACK_LABEL
from dale_jax.attacks.ensemble import AUTOATTACK_STANDARD
from dale_jax.attacks.ensemble import DEFAULT_ATTACKS
from dale_jax.attacks.ensemble import autoattack
from dale_jax.attacks.ensemble import default_settings
from dale_jax.attacks.ensemble import evaluate_robustness
from dale_jax.attacks.ensemble import make_evaluator
from dale_jax.attacks.ensemble import pgd
from dale_jax.attacks.square_attack import margin_and_loss
from dale_jax.attacks.ensemble import fgsm
from dale_jax.attacks.square_attack import square


__all__ = [
    "ATTACKS", "AUTOATTACK_LABEL", "AUTOATTACK_STANDARD", "DEFAULT_ATTACKS", "apgd",
    "autoattack", "checkpoints", "default_settings", "dlr_loss", "dlr_loss_targeted",
    "evaluate_robustness", "fgsm", "halving_condition", "make_evaluator", "margin_and_loss",
    "pgd", "square", "target_classes",
]
