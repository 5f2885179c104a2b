"""What a real API server's validation and Pod Security admission refuse, for the kinds Quantrol creates.

KMock stores whatever it is sent. A cluster does not: it validates object metadata for every kind, validates each
built-in kind's own fields, and, in namespaces labelled for Pod Security, refuses pods that break the level. This
module holds those rules as pure functions, each with the Kubernetes documentation it follows, so the emulation
(apishims.py) answers with the refusal a cluster would give, in the cluster's words. Built-in kinds are also checked
against their OpenAPI schema with kubernetes-validate, the well-kept validator the chart tests use.

What a cluster decides that this does not: defaulting of built-in kinds, every field-level rule of the
built-in kinds beyond their schema and the ones below (e.g. resource requests <= limits), admission webhooks, the
authorizer (RBAC), and the Pod Security levels' version pinning (`enforce-version`): `latest` is assumed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

JSON = dict[str, Any]

# https://kubernetes.io/docs/concepts/overview/working-with-objects/names/
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
# https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#ports: an IANA_SVC_NAME.
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
ANNOTATIONS_MAX_BYTES = 256 * 1024  # https://kubernetes.io/docs/concepts/overview/working-with-objects/annotations/

# Name rules per kind: a Service is a DNS-1035 label (https://kubernetes.io/docs/concepts/services-networking/
# service/#defining-a-service); a Job is a subdomain of at most 63 characters, as its name becomes a pod label
# (https://kubernetes.io/docs/concepts/workloads/controllers/job/#writing-a-job-spec); a Namespace is a DNS-1123
# label; everything else a DNS-1123 subdomain.
NAME_RULES: dict[str, tuple[re.Pattern[str], int, str]] = {
    "Service": (DNS_1035_LABEL, 63, "a DNS-1035 label"),
    "Namespace": (DNS_1123_LABEL, 63, "a lowercase RFC 1123 label"),
    "Job": (DNS_1123_SUBDOMAIN, 63, "a lowercase RFC 1123 subdomain of at most 63 characters"),
}
DEFAULT_NAME_RULE = (DNS_1123_SUBDOMAIN, 253, "a lowercase RFC 1123 subdomain")
# Kinds whose pod template is checked (metadata, containers, ports), as the API server validates them.
WORKLOAD_KINDS = {"Deployment", "Job", "ReplicaSet", "StatefulSet", "DaemonSet"}
# kubernetes-validate's schemas: the kinds Quantrol and the local runner write.
SCHEMA_KINDS = {("v1", "ConfigMap"), ("v1", "Secret"), ("v1", "Service"), ("v1", "Pod"), ("apps/v1", "Deployment"),
                ("batch/v1", "Job")}
SCHEMA_VERSION = "1.29.0"  # the oldest Kubernetes the chart supports (Chart.yaml kubeVersion)


def name_problems(kind: str, name: str) -> list[str]:
    pattern, limit, what = NAME_RULES.get(kind, DEFAULT_NAME_RULE)
    if len(name) > limit or not pattern.match(name):
        return [f"metadata.name: Invalid value: {name!r}: must be {what} of at most {limit} characters"]
    return []


def label_key_problems(key: str, where: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not DNS_1123_SUBDOMAIN.match(prefix))) or len(name) > 63 or not (
            LABEL_NAME.match(name)):
        return [f"{where}: Invalid value: {key!r}: a qualified name must be at most 63 characters of "
                "alphanumerics, '-', '_' or '.', with an optional DNS subdomain prefix and '/'"]
    return []


def meta_problems(meta: Mapping[str, Any], where: str = "metadata") -> list[str]:
    """Labels and annotations of any object (and of a pod template's metadata)."""
    out: list[str] = []
    for key, value in (meta.get("labels") or {}).items():
        out += label_key_problems(key, f"{where}.labels")
        if not isinstance(value, str) or len(value) > 63 or (value and not LABEL_NAME.match(value)):
            out.append(f"{where}.labels: Invalid value: {value!r}: a valid label must be an empty string or at most "
                       "63 characters of alphanumerics, '-', '_' or '.', beginning and ending with an alphanumeric")
    annotations = meta.get("annotations") or {}
    for key in annotations:
        out += label_key_problems(key, f"{where}.annotations")
    size = sum(len(k) + len(str(v)) for k, v in annotations.items())
    if size > ANNOTATIONS_MAX_BYTES:
        out.append(f"{where}.annotations: Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes")
    return out


def containers(pod_spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for container in pod_spec.get(key) or []:
            yield key, container


def pod_spec_problems(pod_spec: Mapping[str, Any], where: str) -> list[str]:
    """Container names (DNS-1123 labels, unique) and port names (IANA_SVC_NAME, unique), as the API server checks
    them: https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/#Container."""
    out: list[str] = []
    seen_containers: set[str] = set()
    seen_ports: set[str] = set()
    for key, container in containers(pod_spec):
        name = str(container.get("name", ""))
        if len(name) > 63 or not DNS_1123_LABEL.match(name):
            out.append(f"{where}.{key}.name: Invalid value: {name!r}: must be a DNS-1123 label")
        if name in seen_containers:
            out.append(f"{where}.{key}.name: Duplicate value: {name!r}")
        seen_containers.add(name)
        for port in container.get("ports") or []:
            port_name = port.get("name")
            if port_name is None:
                continue
            if len(port_name) > 15 or not IANA_SVC_NAME.match(port_name) or "--" in port_name or not re.search(
                    "[a-z]", port_name):
                out.append(f"{where}.{key}.ports.name: Invalid value: {port_name!r}: must be no more than 15 "
                           "characters, lowercase alphanumerics and '-', with at least one letter")
            if port_name in seen_ports:
                out.append(f"{where}.{key}.ports.name: Duplicate value: {port_name!r}")
            seen_ports.add(port_name)
    return out


def kind_problems(obj: Mapping[str, Any]) -> list[str]:
    """The per-kind rules this emulation applies to a built-in object about to be stored."""
    kind = str(obj.get("kind"))
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    out = name_problems(kind, str(meta.get("name", ""))) + meta_problems(meta)
    if kind == "Pod":
        out += pod_spec_problems(spec, "spec")
    if kind in WORKLOAD_KINDS:
        template = spec.get("template") or {}
        out += meta_problems(template.get("metadata") or {}, "spec.template.metadata")
        out += pod_spec_problems(template.get("spec") or {}, "spec.template.spec")
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if kind != "Job" and not selector.items() <= labels.items():
            out.append("spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`")
    if kind == "Service":
        for port in spec.get("ports") or []:  # a Service port's name is a DNS-1123 label
            if port.get("name") is not None and not DNS_1123_LABEL.match(str(port["name"])):
                out.append(f"spec.ports.name: Invalid value: {port['name']!r}: must be a DNS-1123 label")
        for key, value in (spec.get("selector") or {}).items():
            out += meta_problems({"labels": {key: value}}, "spec.selector")
    return out + schema_problems(obj)


def schema_problems(obj: Mapping[str, Any]) -> list[str]:
    """The kind's OpenAPI schema (types, required fields, enums), through kubernetes-validate."""
    if (obj.get("apiVersion"), obj.get("kind")) not in SCHEMA_KINDS:
        return []
    import kubernetes_validate

    try:
        kubernetes_validate.validate(dict(obj), SCHEMA_VERSION, strict=False)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path)) or '(root)'}: {exc.message}"]
    return []


# --- Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/) ----------------

ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
WARN_LABEL = "pod-security.kubernetes.io/warn"
# Restricted: "Volume Types" control.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
VOLUME_SOURCES = RESTRICTED_VOLUMES | {"hostPath", "nfs", "iscsi", "gitRepo", "rbd", "cephfs", "glusterfs", "fc",
                                       "flexVolume", "azureFile", "azureDisk", "awsElasticBlockStore", "cinder",
                                       "gcePersistentDisk", "portworxVolume", "quobyte", "scaleIO", "storageos",
                                       "vsphereVolume", "photonPersistentDisk", "flocker"}
LEVELS = ("privileged", "baseline", "restricted")


def _context(container: Mapping[str, Any]) -> Mapping[str, Any]:
    return container.get("securityContext") or {}


def baseline_violations(pod_spec: Mapping[str, Any]) -> list[str]:
    """The baseline level's controls that Quantrol's pods could trip: host namespaces, privileged containers,
    hostPath volumes, host ports, an Unconfined seccomp profile."""
    out = [f"host namespaces ({flag}=true)" for flag in ("hostNetwork", "hostPID", "hostIPC") if pod_spec.get(flag)]
    for _, c in containers(pod_spec):
        if _context(c).get("privileged"):
            out.append(f'privileged (container "{c.get("name")}" must not set securityContext.privileged=true)')
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f'hostPort (container "{c.get("name")}" uses hostPort {port["hostPort"]})')
    for volume in pod_spec.get("volumes") or []:
        if "hostPath" in volume:
            out.append(f'hostPath volumes (volume "{volume.get("name")}")')
    profiles = [(pod_spec.get("securityContext") or {}).get("seccompProfile") or {}]
    profiles += [_context(c).get("seccompProfile") or {} for _, c in containers(pod_spec)]
    if any(p.get("type") == "Unconfined" for p in profiles):
        out.append('seccompProfile (pod or containers must not set securityContext.seccompProfile.type to '
                   '"Unconfined")')
    return out


def restricted_violations(pod_spec: Mapping[str, Any]) -> list[str]:
    """Baseline plus the restricted level's controls, in Pod Security admission's own wording."""
    out = baseline_violations(pod_spec)
    pod_context = pod_spec.get("securityContext") or {}
    for volume in pod_spec.get("volumes") or []:
        kind = next((k for k in volume if k in VOLUME_SOURCES), None)
        if kind is not None and kind not in RESTRICTED_VOLUMES:
            out.append(f'restricted volume types (volume "{volume.get("name")}" uses restricted volume type '
                       f'"{kind}")')
    for _, c in containers(pod_spec):
        name, sc = c.get("name"), _context(c)
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f'allowPrivilegeEscalation != false (container "{name}" must set '
                       "securityContext.allowPrivilegeEscalation=false)")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []) or set(capabilities.get("add") or []) - {
                "NET_BIND_SERVICE"}:
            out.append(f'unrestricted capabilities (container "{name}" must set securityContext.capabilities.'
                       'drop=["ALL"])')
        if sc.get("runAsNonRoot") is not True and pod_context.get("runAsNonRoot") is not True:
            out.append(f'runAsNonRoot != true (pod or container "{name}" must set securityContext.runAsNonRoot=true)')
        if sc.get("runAsUser") == 0:
            out.append(f'runAsUser=0 (container "{name}" must not set runAsUser=0)')
        profile = (sc.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            out.append(f'seccompProfile (pod or container "{name}" must set securityContext.seccompProfile.type to '
                       '"RuntimeDefault" or "Localhost")')
    if pod_context.get("runAsUser") == 0:
        out.append("runAsUser=0 (pod must not set runAsUser=0)")
    return out


def violations(level: str, pod_spec: Mapping[str, Any]) -> list[str]:
    if level == "restricted":
        return restricted_violations(pod_spec)
    if level == "baseline":
        return baseline_violations(pod_spec)
    return []


def pod_spec_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod spec Pod Security looks at: a Pod's own, or a workload's template."""
    if obj.get("kind") == "Pod":
        return obj.get("spec") or {}
    if obj.get("kind") in WORKLOAD_KINDS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return None


def pod_security_message(level: str, found: list[str]) -> str:
    return f'violates PodSecurity "{level}:latest": ' + ", ".join(found)



# --- defaulting the API server does that a client can see: quantities in canonical form -------------------------

_QUANTITY = re.compile(r"^([+-]?[0-9]*\.?[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]


def canonical_quantity(text: str) -> str:
    """apimachinery's Quantity round trip (k8s.io/apimachinery/pkg/api/resource/quantity.go, CanonicalizeBytes):
    the server stores `0.5` as `500m` and `1.5Gi` as `1536Mi`. Written apart from the operator's own
    canonicalisation on purpose: this one stands for the server's. Unparseable text is left alone (the schema
    check reports it)."""
    from decimal import Decimal

    match = _QUANTITY.match(str(text).strip())
    if match is None:
        return str(text)
    number, suffix = Decimal(match[1]), match[2] or ""
    binary = suffix.endswith("i")
    if binary:
        value = number * (Decimal(1024) ** _BINARY.index(suffix))
    elif suffix[:1] in ("e", "E"):
        value = number.scaleb(int(suffix[1:]))
    else:
        value = number.scaleb(_DECIMAL[suffix])
    if value == 0:
        return "0"
    if binary and abs(value) >= 1024 and value == value.to_integral_value():
        whole, power = int(value), 0
        while whole % 1024 == 0 and power < len(_BINARY) - 1:
            whole, power = whole // 1024, power + 1
        return f"{whole}{_BINARY[power]}"
    sign, digits, exponent = value.normalize().as_tuple()
    mantissa = int("".join(map(str, digits))) * 10 ** (int(exponent) % 3)
    exponent = int(exponent) - int(exponent) % 3
    names = {v: k for k, v in _DECIMAL.items()}
    unit = (f"e{exponent}" if exponent else "") if suffix[:1] in ("e", "E") else names.get(exponent, f"e{exponent}")
    return f"{'-' if sign else ''}{mantissa}{unit}"


def normalize(obj: JSON) -> JSON:
    """Requests and limits of every container of a Pod or workload template, as the server stores them."""
    pod_spec = pod_spec_of(obj)
    for _, container in containers(pod_spec or {}):
        resources = container.get("resources")
        if isinstance(resources, dict):
            for section in ("requests", "limits"):
                values = resources.get(section)
                if isinstance(values, dict):
                    resources[section] = {k: canonical_quantity(str(v)) for k, v in values.items()}
    return obj
