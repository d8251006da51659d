"""RoutingPolicy ``spec.admission``: per-tenant rate and concurrency limits, fair-queueing weights and the
router-side wait queue.

This module owns the admission part of the RoutingPolicy schema (its fields, defaults and rules). The
router enforces it in :mod:`corral.router.admission`:

* every request belongs to a tenant (the name its API key maps to; requests without auth count as the
  tenant ``""``, shown as ``anonymous``) and is checked against that tenant's token buckets
  (requests/s and tokens/s, each with a burst) and concurrency limit;
* when every replica of the model is at ``spec.load.maxQueueRequestsPerReplica``, a request waits in the
  router's queue (at most ``maxWaiting`` requests, at most ``maxWaitMs`` each); waiting requests leave the
  queue by weighted fair queueing between tenants (``weight``), so under overload each tenant gets a share
  of the fleet proportional to its weight;
* anything over a limit gets HTTP 429 / gRPC RESOURCE_EXHAUSTED with a ``Retry-After`` estimate at once.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from .common import (
    TENANT_MAX,
    TENANT_PATTERN,
    CelRule,
    CorralModel,
    K8sFloat,
    K8sInt,
    cel,
    duplicates,
    list_map,
    raise_issues,
)

MAX_TENANTS = 1024

RULE_BURST_REQUESTS_NEEDS_RATE = CelRule(
    rule="!has(self.burstRequests) || has(self.requestsPerSecond)",
    field_path=".burstRequests",
    message="needs requestsPerSecond",
)
RULE_BURST_TOKENS_NEEDS_RATE = CelRule(
    rule="!has(self.burstTokens) || has(self.tokensPerSecond)",
    field_path=".burstTokens",
    message="needs tokensPerSecond",
)


class TenantLimits(CorralModel):
    """Limits and fair-queueing weight of one tenant (every limit is off unless set)."""

    model_config = ConfigDict(
        json_schema_extra=cel(RULE_BURST_REQUESTS_NEEDS_RATE, RULE_BURST_TOKENS_NEEDS_RATE)
    )

    weight: K8sInt = Field(
        default=1,
        ge=1,
        le=1000,
        description="Fair-queueing weight: under overload, tenants get fleet capacity in proportion to it.",
    )
    requests_per_second: K8sFloat | None = Field(
        default=None, gt=0, le=1e6, description="Sustained request rate (token bucket); unlimited if unset."
    )
    burst_requests: K8sInt | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Requests allowed at once above the rate (bucket size); one second's worth if unset.",
    )
    tokens_per_second: K8sFloat | None = Field(
        default=None,
        gt=0,
        le=1e9,
        description="Sustained tokens per second (prompt tokens + max_tokens of each request); unlimited "
        "if unset.",
    )
    burst_tokens: K8sInt | None = Field(
        default=None,
        ge=1,
        le=1_000_000_000,
        description="Tokens allowed at once above the rate (bucket size; also the largest request the "
        "tenant may send); one second's worth if unset.",
    )
    max_concurrency: K8sInt | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Requests of the tenant in flight at once (more wait in the queue); unlimited if unset.",
    )

    @model_validator(mode="after")
    def _rules(self) -> TenantLimits:
        issues = []
        if self.burst_requests is not None and self.requests_per_second is None:
            issues.append((".burstRequests", RULE_BURST_REQUESTS_NEEDS_RATE.message))
        if self.burst_tokens is not None and self.tokens_per_second is None:
            issues.append((".burstTokens", RULE_BURST_TOKENS_NEEDS_RATE.message))
        raise_issues(issues)
        return self


class TenantAdmission(TenantLimits):
    """A named tenant's limits."""

    name: str = Field(
        min_length=1,
        max_length=TENANT_MAX,
        pattern=TENANT_PATTERN,
        description=(
            "Tenant name as the API keys name it (spec.tenants.secretRef): letters, digits, '.', '_', '-'."
        ),
    )


class AdmissionSpec(CorralModel):
    """Admission control: what a router lets in, in which order, and how long a request may wait."""

    max_waiting: K8sInt = Field(
        default=1024,
        ge=0,
        le=1_000_000,
        description=(
            "Requests that may wait in the router for fleet capacity (every replica at "
            "load.maxQueueRequestsPerReplica or the tenant at maxConcurrency); beyond it, 429 at once. "
            "0: no waiting."
        ),
    )
    max_wait_ms: K8sFloat = Field(
        default=1000.0,
        ge=0,
        le=600_000,
        description=(
            "Longest wait in that queue; a request whose estimated wait is longer gets 429 at once, one "
            "still waiting after it gets 429 then."
        ),
    )
    default_tenant: TenantLimits = Field(
        default_factory=TenantLimits,
        description="Limits of tenants not listed in tenants, and of requests without an API key.",
        json_schema_extra={"default": {}},
    )
    tenants: list[TenantAdmission] = Field(
        default_factory=list,
        max_length=MAX_TENANTS,
        description="Per-tenant limits and weights (unique names).",
        json_schema_extra=list_map(),
    )

    @model_validator(mode="after")
    def _unique(self) -> AdmissionSpec:
        raise_issues(duplicates([t.name for t in self.tenants], ".tenants"))
        return self

    def limits(self, tenant: str) -> TenantLimits:
        """The limits of ``tenant`` (``default_tenant`` when not listed)."""
        for t in self.tenants:
            if t.name == tenant:
                return t
        return self.default_tenant
