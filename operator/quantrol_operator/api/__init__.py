"""Quantrol's API types (group quantrol.io, version v1alpha1): the single source of the CRDs."""

from quantrol_operator.api.common import API_VERSION, GROUP, VERSION, Condition, ConditionStatus
from quantrol_operator.api.kinds import KINDS, KINDS_BY_NAME, QUANTIZED_MODEL, SERVING_POLICY, ResourceKind
from quantrol_operator.api.quantizedmodel import QuantizedModel, QuantizedModelSpec, QuantizedModelStatus
from quantrol_operator.api.servingpolicy import ServingPolicy, ServingPolicySpec, ServingPolicyStatus

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "KINDS_BY_NAME",
    "QUANTIZED_MODEL",
    "SERVING_POLICY",
    "VERSION",
    "Condition",
    "ConditionStatus",
    "QuantizedModel",
    "QuantizedModelSpec",
    "QuantizedModelStatus",
    "ResourceKind",
    "ServingPolicy",
    "ServingPolicySpec",
    "ServingPolicyStatus",
]
