"""The operator's kopf handlers. Importing this package registers them: `kopf run -m quantrol_operator.handlers`.

Handlers stay thin (read, plan, apply, patch status); the reconcile logic lives elsewhere and arrives with later
issues. For now the operator logs in, configures kopf, and says what it watches and which objects it has seen.
"""

from quantrol_operator.handlers import login, quantizedmodel, seen, servingpolicy, settings

__all__ = ["login", "quantizedmodel", "seen", "servingpolicy", "settings"]
