"""Robustness and generalization of neural networks under norm-bounded weight perturbations.

A network is its list of weight matrices (:mod:`.network`), or a :class:`Network` of steps
(:mod:`.layers`: convolutions, biases, folded BatchNorm, pooling, residual blocks, each with the norm
inequality its bound rule uses); :mod:`.bounds` bounds the change of
its margins by products of norms, :mod:`.relaxation` by interval bounds and a linear relaxation,
:mod:`.certify` turns the bound into certificates, :mod:`.attacks` searches the budget
set from below, :mod:`.generalization` evaluates Theorem 4 and :mod:`.training` trains with the
bound in the loss.
"""

from .attacks import (
    attacked_robust,
    box_attack,
    box_forward,
    materialize_box_perturbation,
    project_rows_l1,
    random_boundary_perturbation,
    random_perturbation_accuracy,
    runner_up,
    weight_attack,
)
from .bounds import (
    assemble_bound,
    layer_budgets,
    layer_mask,
    margin_change_bound,
    margin_change_bound_all_pairs,
    margin_change_bound_with_bias,
    network_bound,
    pairwise_last_layer_l1,
    product_gap,
    relative_budget,
    single_layer_bound,
)
from .certify import (
    BOUNDS,
    certified_accuracy,
    certified_margin,
    certified_prediction,
    certify,
    margin_lower_bound,
    max_certified_budget,
)
from .relaxation import interval_margin_bound, linear_relaxation_margin_bound
from .layers import Network, build_network, fold_batchnorm
from .generalization import rademacher_bound, ramp, robust_surrogate_loss, theorem4_bound
from .network import (
    ACTIVATIONS,
    UnsupportedNetworkError,
    forward,
    forward_perturbed,
    hidden_states,
    layer_loop,
    layer_norms,
    margins,
    network_from_model,
)
from .training import VARIANTS, TrainConfig, model_weights, robust_loss, train_mlp

__all__ = [
    # network
    "UnsupportedNetworkError", "ACTIVATIONS", "network_from_model", "forward", "forward_perturbed",
    "hidden_states", "layer_loop", "layer_norms", "margins",
    # bounds
    "margin_change_bound", "margin_change_bound_all_pairs", "single_layer_bound", "margin_change_bound_with_bias",
    "relative_budget", "layer_mask", "layer_budgets", "assemble_bound", "pairwise_last_layer_l1", "product_gap",
    "network_bound",
    # layers
    "Network", "build_network", "fold_batchnorm",
    # certify
    "certified_margin", "certify", "certified_prediction", "certified_accuracy", "max_certified_budget",
    "BOUNDS", "margin_lower_bound",
    # relaxation
    "interval_margin_bound", "linear_relaxation_margin_bound",
    # attacks
    "weight_attack", "box_attack", "box_forward", "materialize_box_perturbation", "project_rows_l1",
    "random_boundary_perturbation", "random_perturbation_accuracy", "attacked_robust", "runner_up",
    # generalization
    "ramp", "robust_surrogate_loss", "rademacher_bound", "theorem4_bound",
    # training
    "VARIANTS", "TrainConfig", "robust_loss", "train_mlp", "model_weights",
]
