"""The operator's kopf handlers: `kopf run -m quantrol_operator.handlers` registers them on import.

Handlers are wiring only: read the object, observe (observe/), plan (planning/, pure), apply (apply.py, kube.py),
deliver the router config (delivery.py), patch status. `settings` configures kopf and makes the runtime at start-up.
"""

from quantrol_operator.handlers import login, quantizedmodel, servingpolicy, settings

__all__ = ["login", "quantizedmodel", "servingpolicy", "settings"]
