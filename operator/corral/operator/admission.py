"""The operator's validating admission webhook (``corral operator run --webhook``).

What the CRDs cannot check, because it needs other objects, is checked here with the very function
``corral validate`` uses offline (:func:`corral.api.validation.admission_problems`, which runs
:func:`~corral.api.validation.cross_problems` on the objects stored in the namespace with and without the
change): a RoutingPolicy's pins must name adapters of its ModelPool, one RoutingPolicy per ModelPool, and
a ModelPool's ``routingPolicyRef`` must agree with the policy's ``poolRef``. A change that adds such a
problem is denied with the same ``Kind/name: field.path: message`` lines ``corral validate`` prints after
its file name. (That each adapter's ``baseModel`` is a model of its pool needs no other object: the CRD's
own rule checks it.)

Importing this module registers the handlers in kopf's default registry, so it is imported only when the
webhook is on (kopf refuses to start with admission handlers and no webhook server). kopf manages the
``ValidatingWebhookConfiguration`` named :data:`WEBHOOK_CONFIGURATION` (``settings.admission.managed``):
it points it at this process and removes the webhooks again when the operator stops. The webhooks use
``failurePolicy: Ignore``: while no operator answers, objects are admitted and the operator reports
inconsistencies as a Degraded condition when it reconciles them.

The server listens with TLS on ``--webhook-listen`` / ``--webhook-port`` and is reached by the apiserver
at ``--webhook-host`` (127.0.0.1 for a local control plane). Without ``--webhook-certfile``, the operator
generates a self-signed certificate for that host at startup (``cryptography``) and hands it to the
apiserver as the webhook's ``caBundle``. The webhooks match every namespace (kopf sets no
namespaceSelector), whatever ``-n`` the operator watches. Several replicas (``--peering``) each serve and
register the webhook: give them one certificate (``--webhook-certfile``/``--webhook-keyfile``, e.g. from a
Secret) and one ``--webhook-host`` (a Service), so that what they register is identical; with a
self-signed certificate each, they would keep replacing each other's ``caBundle``.
"""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from corral.api.validation import admission_problems, load_object

from .kube import GROUP, POLICIES, POOLS, VERSION

WEBHOOK_CONFIGURATION = "corral.dev"


@dataclass
class WebhookConfig:
    host: str = "127.0.0.1"  # what the apiserver dials (the certificate's SAN)
    port: int = 9443
    listen: str | None = None  # listening address (default: host)
    certfile: str | None = None
    pkeyfile: str | None = None


CONFIG = WebhookConfig()
"""Set by ``corral operator run --webhook`` before kopf starts."""


def self_signed(hosts: list[str]) -> tuple[bytes, bytes]:
    """A self-signed CA-capable certificate for ``hosts`` (IP addresses become IP SANs) and its key (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                key_cert_sign=True,
                crl_sign=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def webhook_server(cfg: WebhookConfig) -> kopf.WebhookServer:
    certfile, pkeyfile = cfg.certfile, cfg.pkeyfile
    if certfile is None:
        cert, key = self_signed([cfg.host])
        tmp = Path(tempfile.mkdtemp(prefix="corral-webhook-"))
        (tmp / "tls.crt").write_bytes(cert)
        (tmp / "tls.key").write_bytes(key)
        (tmp / "tls.key").chmod(0o600)
        certfile, pkeyfile = str(tmp / "tls.crt"), str(tmp / "tls.key")
    return kopf.WebhookServer(
        addr=cfg.listen or cfg.host, port=cfg.port, host=cfg.host, certfile=certfile, pkeyfile=pkeyfile
    )


@kopf.on.startup()
def _admission_settings(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.admission.server = webhook_server(CONFIG)
    settings.admission.managed = WEBHOOK_CONFIGURATION


def check(body: Any, old: Any, namespace: str | None) -> None:
    """Raise :class:`kopf.AdmissionError` (422) when storing ``body`` (over ``old``) adds cross-object
    problems among the objects stored in its namespace."""
    from .handlers import kube

    doc = dict(body)
    ns = namespace or (doc.get("metadata") or {}).get("namespace") or "default"
    doc["metadata"] = {**(doc.get("metadata") or {}), "namespace": ns}
    new = load_object(doc)
    if new is None:  # the apiserver's schema decides about a single object
        return
    k = kube()
    others = []
    for plural in (POOLS, POLICIES):
        for item in k.list(GROUP, VERSION, plural, ns):
            if (item.get("metadata") or {}).get("deletionTimestamp"):
                continue
            obj = load_object(item)
            if obj is not None:
                others.append(obj)
    previous = (
        load_object({**dict(old), "metadata": {**(old.get("metadata") or {}), "namespace": ns}})
        if old
        else None
    )
    problems = admission_problems(new, others, previous)
    if problems:
        raise kopf.AdmissionError("; ".join(str(p) for p in problems), code=422)


@kopf.on.validate(
    GROUP, VERSION, POOLS, id="validate-pool", operations=["CREATE", "UPDATE"], ignore_failures=True
)
@kopf.on.validate(
    GROUP, VERSION, POLICIES, id="validate-policy", operations=["CREATE", "UPDATE"], ignore_failures=True
)
def validate(body: kopf.Body, namespace: str | None, **kw: Any) -> None:
    check(body, kw.get("old"), namespace)
