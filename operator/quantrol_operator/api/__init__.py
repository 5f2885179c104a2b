"""Quantrol's API types (group quantrol.io, version v1alpha1): the single source of the CRDs."""

from quantrol_operator.api.common import API_VERSION, GROUP, VERSION, Condition, ConditionStatus
from quantrol_operator.api.quantizedmodel import QuantizedModel, QuantizedModelSpec, QuantizedModelStatus
from quantrol_operator.api.servingpolicy import ServingPolicy, ServingPolicySpec, ServingPolicyStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "ConditionStatus",
    "QuantizedModel",
    "QuantizedModelSpec",
    "QuantizedModelStatus",
    "ServingPolicy",
    "ServingPolicySpec",
    "ServingPolicyStatus",
]
