"""setsens — set-valued sensitivity analysis of neural networks.

Training data → weights: :mod:`setsens.solution_set` estimates the solution set after a data
perturbation (the graphical derivative), :mod:`setsens.lipschitz` its Lipschitz modulus.
Weights → predictions: :mod:`setsens.weights` certifies margins under weight perturbations.
"""

from .problem import Perturbation, Problem, cross_entropy, squared_error

__version__ = "0.1.0"
__all__ = ["Problem", "Perturbation", "cross_entropy", "squared_error", "__version__"]
