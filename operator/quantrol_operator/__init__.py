"""Quantrol's Kubernetes operator: API models, CRD generation, planners and thin kopf handlers."""

__version__ = "0.1.0"
