"""What runs in the pods Quantrol creates: calibration jobs, artifact fetch, the serving launcher and router.

The contracts (configs and reports) are torch-free so that the operator image can import them.
"""

__version__ = "0.1.0"
