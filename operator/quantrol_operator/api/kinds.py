"""The custom resource kinds, named once: kind, plural, short name and models. Everything that addresses a
Quantrol resource (crdgen, kopf handlers, the API client, the CLI) takes these from here."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from quantrol_operator.api import quantizedmodel, servingpolicy
from quantrol_operator.api.common import API_VERSION, GROUP, VERSION


@dataclass(frozen=True)
class ResourceKind:
    kind: str
    plural: str
    short_name: str
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    object_model: type[BaseModel]  # the whole object: its cross-field rules sit on the CRD's root (metadata.name)
    group: str = GROUP
    version: str = VERSION
    api_version: str = API_VERSION

    @property
    def names(self) -> tuple[str, ...]:
        """What a person may type for it: `qm`, `quantizedmodel`, `quantizedmodels`."""
        return (self.short_name, self.kind.lower(), self.plural)


QUANTIZED_MODEL = ResourceKind(quantizedmodel.KIND, quantizedmodel.PLURAL, "qm", quantizedmodel.QuantizedModelSpec,
                               quantizedmodel.QuantizedModelStatus, quantizedmodel.QuantizedModel)
SERVING_POLICY = ResourceKind(servingpolicy.KIND, servingpolicy.PLURAL, "sp", servingpolicy.ServingPolicySpec,
                              servingpolicy.ServingPolicyStatus, servingpolicy.ServingPolicy)
KINDS: tuple[ResourceKind, ...] = (QUANTIZED_MODEL, SERVING_POLICY)
KINDS_BY_NAME: dict[str, ResourceKind] = {name: k for k in KINDS for name in k.names}
