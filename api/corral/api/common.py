"""Shared building blocks of the CRD models: the base model, metadata, conditions and validation rules.

This module owns:

* :class:`CorralModel`, the base of every spec/status model (camelCase aliases, unknown fields rejected);
* :class:`ObjectMeta` (permissive) and :class:`Condition` (Kubernetes condition shape);
* :class:`CelRule`, one cross-field rule written once and used twice: rendered into the CRD as a CEL
  ``x-kubernetes-validations`` entry, and checked in Python by the model validators with the *same*
  message text, so ``corral validate`` and the kube-apiserver reject the same objects with the same words;
* :func:`rule_error`, the pydantic error that carries field-precise rule violations.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from . import names

GROUP = "corral.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
"""Lower-case RFC 1123 name: what Kubernetes, Ray Serve and file systems all accept."""
NAME_MAX = 63

TENANT_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
"""A tenant name (1-63 letters, digits, '.', '_' or '-'): in key files, private adapters, admission limits and
selection signals alike, so a name that one place accepts can never be one that another cannot match."""
TENANT_MAX = 63

RULE_ERROR_TYPE = "corral_rule"
"""pydantic error type of :func:`rule_error`; its ``ctx['issues']`` holds ``(relative_path, message)``."""

NOT_FINITE = "must be a finite number"
"""Infinity and NaN: not JSON, so neither kubectl nor the apiserver can carry them."""


# ------------------------------------------------------------------ scalar types, as strict as the apiserver


K8sInt = Annotated[int, Field(strict=True)]
"""``int`` as the apiserver checks ``type: integer``: ``"2"``, ``true`` and ``2.5`` are rejected. (A whole
float such as YAML's ``4.0`` is read as ``4`` by :class:`~corral.api.validation.KubeLoader`, as kubectl
does.)"""
K8sFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""``float`` as the apiserver checks ``type: number``: ints pass; "2", true, .inf and .nan fail."""
K8sBool = StrictBool
"""``bool`` as the apiserver checks ``type: boolean``: ``"false"``, ``0`` and ``1`` are rejected."""


class CorralModel(BaseModel):
    """Base of all CRD models: camelCase field names in YAML/JSON, snake_case in Python, strict keys."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
    )

    def to_k8s(self) -> dict[str, Any]:
        """The object as Kubernetes JSON: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def name_field(description: str, **kwargs: Any) -> Any:
    """A required lower-case RFC 1123 name field."""
    return Field(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN, description=description, **kwargs)


def list_map(key: str = "name") -> dict[str, Any]:
    """``json_schema_extra`` for a list of objects keyed by ``key`` (the apiserver rejects duplicate keys)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


@dataclass(frozen=True)
class CelRule:
    """One CEL validation rule, evaluated by the apiserver with ``self`` = the object it is attached to.

    ``message`` is the fixed text; ``message_expression`` (optional CEL) adds the offending values. The
    Python twin of the rule reports ``message`` plus the same detail, so messages match word for word.
    """

    rule: str
    message: str
    field_path: str | None = None
    message_expression: str | None = None
    reason: str | None = None

    def to_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def cel(*rules: CelRule) -> dict[str, Any]:
    """``json_schema_extra`` that attaches ``rules`` as ``x-kubernetes-validations``."""
    return {"x-kubernetes-validations": [r.to_schema() for r in rules]}


Issue = tuple[str, str]
"""A rule violation: (path relative to the validated object, e.g. ``.maxReplicas`` or ``.adapters[2]``,
message)."""


def rule_error(issues: Sequence[Issue]) -> PydanticCustomError:
    """A pydantic error carrying one or more field-precise rule violations of one object."""
    text = "; ".join(f"{path.lstrip('.')}: {msg}" if path else msg for path, msg in issues)
    return PydanticCustomError(RULE_ERROR_TYPE, "{text}", {"text": text, "issues": tuple(issues)})


def raise_issues(issues: Iterable[Issue]) -> None:
    """Raise :func:`rule_error` if there is any issue."""
    found = list(issues)
    if found:
        raise rule_error(found)


def duplicates(keys: Sequence[str], list_path: str, key: str = "name") -> list[Issue]:
    """Issues for repeated keys in a list-map keyed by ``key``, worded like the apiserver's check."""
    seen: set[str] = set()
    issues: list[Issue] = []
    for i, name in enumerate(keys):
        if name in seen:
            issues.append((f"{list_path}[{i}]", f"Duplicate value: {{{json.dumps(key)}:{json.dumps(name)}}}"))
        seen.add(name)
    return issues


def set_duplicates(values: Sequence[str], list_path: str) -> list[Issue]:
    """Issues for repeated members of a list-type set, worded like the apiserver's check."""
    seen: set[str] = set()
    issues: list[Issue] = []
    for i, value in enumerate(values):
        if value in seen:
            issues.append((f"{list_path}[{i}]", f"Duplicate value: {json.dumps(value)}"))
        seen.add(value)
    return issues


def list_set() -> dict[str, Any]:
    """``json_schema_extra`` for a list of unique scalars (the apiserver rejects duplicate members)."""
    return {"x-kubernetes-list-type": "set"}


class ObjectMeta(BaseModel):
    """Kubernetes object metadata, checked as the apiserver checks a custom resource's metadata.

    ``name`` is required (Corral objects refer to each other by name) and must be a DNS-1123 subdomain;
    label keys and values, annotation keys and the namespace follow Kubernetes' syntax. The fields the
    apiserver sets (uid, resourceVersion, ...) are accepted so ``kubectl get -o yaml`` output validates;
    any other field is unknown, as under kubectl's ``fieldValidation=Strict``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)

    name: str = Field(min_length=1, description="Object name, unique in its namespace (DNS-1123 subdomain).")
    namespace: str | None = Field(default=None, description="Namespace of the object (DNS-1123 label).")
    labels: dict[str, str] | None = Field(default=None, description="Labels (key/value pairs).")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations (key/value pairs).")
    # set by the apiserver (or by clients that copy a live object)
    generate_name: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: K8sInt | None = None
    creation_timestamp: Any = None
    deletion_timestamp: Any = None
    deletion_grace_period_seconds: K8sInt | None = None
    finalizers: list[str] | None = None
    owner_references: list[dict[str, Any]] | None = None
    managed_fields: list[dict[str, Any]] | None = None
    self_link: str | None = None

    @model_validator(mode="after")
    def _syntax(self) -> ObjectMeta:
        issues: list[Issue] = []
        issues += [
            (".name", f"{m} (got {json.dumps(self.name)})") for m in names.dns1123_subdomain(self.name)
        ]
        if self.namespace is not None:
            got = f" (got {json.dumps(self.namespace)})"
            issues += [(".namespace", m + got) for m in names.dns1123_label(self.namespace)]
        issues += [(".labels", m) for m in names.label_issues(self.labels or {})]
        issues += [(".annotations", m) for m in names.annotation_issues(self.annotations or {})]
        raise_issues(issues)
        return self


ConditionType = Literal["Ready", "Progressing", "Degraded"]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(CorralModel):
    """One status condition, in the shape of Kubernetes' ``metav1.Condition``."""

    type: ConditionType = Field(description="Condition type: Ready, Progressing or Degraded.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        max_length=1024,
        pattern=r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$",
        description="CamelCase machine-readable reason of the last transition.",
    )
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: datetime | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )
    observed_generation: K8sInt | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed from."
    )


def conditions_field() -> Any:
    return Field(
        default_factory=list,
        max_length=8,
        description="Latest observations of the object's state (Ready, Progressing, Degraded).",
        json_schema_extra=list_map("type"),
    )


@dataclass(frozen=True)
class PrinterColumn:
    """One ``additionalPrinterColumns`` entry of a CRD version (what ``kubectl get`` shows)."""

    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0

    def to_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "jsonPath": self.json_path, "type": self.type}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        return out


AGE_COLUMN = PrinterColumn("Age", ".metadata.creationTimestamp", "date")
READY_COLUMN = PrinterColumn(
    "Ready", '.status.conditions[?(@.type=="Ready")].status', description="Ready condition status."
)


@dataclass(frozen=True)
class CrdInfo:
    """Names and printer columns of one kind's CRD (the schema itself comes from the pydantic model)."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    printer_columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = ("corral",)
    scope: Literal["Namespaced", "Cluster"] = "Namespaced"

    @property
    def name(self) -> str:
        return f"{self.plural}.{GROUP}"
