"""Robustness and generalization of bias-free MLPs under norm-bounded weight perturbations."""
