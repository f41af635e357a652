"""setsens — set-valued sensitivity analysis of neural networks.

Training data → weights: :func:`setsens.estimate` returns the estimated new solution set after a
data perturbation (the graphical derivative, in its Hessian or Gauss–Newton form, or the influence
function as a baseline); :func:`setsens.analyze` grades it and its effect on predictions;
:func:`setsens.training_tangent` differentiates the fine-tuning a user runs (:class:`setsens.Training`) along the
move, and ``analyze(..., "training-tangent")`` grades it and says for which steps it holds;
:func:`setsens.scan` (or :class:`setsens.Audit`, which owns the problem and its factor) audits how far each
training point can move it; :mod:`setsens.lipschitz` its Lipschitz modulus.
Convex models (least squares, L2 logistic/softmax regression): :mod:`setsens.convex_certificate` bounds the
retrained minimiser under any poisoning of K points, proved end to end (:class:`setsens.ConvexModel`).
Weights → predictions: :mod:`setsens.weights` certifies margins under weight perturbations.
"""

from .analysis import Analysis, analyze, analyze_training, validity
from .filters import ggn_filter, proximal_prediction
from .finetune import Training
from .convex_certificate import ConvexCertificate, ConvexModel
from .audit import Audit, GramFactor, Scan, answer_queries, exact_modulus, group_modulus, input_jacobians, scan
from .perturb import gradient_perturbation, random_perturbation
from .problem import Perturbation, Problem, cross_entropy, squared_error
from .progress import Progress
from .solution_set import RadiusOptions, SolutionSet, SolveOptions, estimate
from .tangent import TrainingTangent, training_tangent

__version__ = "0.1.0"
__all__ = ["Problem", "Perturbation", "cross_entropy", "squared_error", "estimate", "SolutionSet", "SolveOptions",
           "RadiusOptions", "gradient_perturbation", "random_perturbation", "analyze", "Analysis", "scan", "Scan",
           "Audit", "GramFactor", "group_modulus", "input_jacobians", "exact_modulus", "answer_queries", "Training",
           "training_tangent", "TrainingTangent", "analyze_training", "validity", "ggn_filter", "proximal_prediction",
           "ConvexModel", "ConvexCertificate", "Progress", "__version__"]
