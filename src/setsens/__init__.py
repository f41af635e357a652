"""setsens — set-valued sensitivity analysis of neural networks.

Training data → weights: :func:`setsens.estimate` returns the estimated new solution set after a
data perturbation (the graphical derivative, in its Hessian or Gauss–Newton form, or the influence
function as a baseline); :mod:`setsens.lipschitz` its Lipschitz modulus.
Weights → predictions: :mod:`setsens.weights` certifies margins under weight perturbations.
"""

from .perturb import gradient_perturbation, random_perturbation
from .problem import Perturbation, Problem, cross_entropy, squared_error
from .solution_set import RadiusOptions, SolutionSet, SolveOptions, estimate

__version__ = "0.1.0"
__all__ = ["Problem", "Perturbation", "cross_entropy", "squared_error", "estimate", "SolutionSet", "SolveOptions",
           "RadiusOptions", "gradient_perturbation", "random_perturbation", "__version__"]
