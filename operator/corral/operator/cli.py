"""``corral operator``: run the Kubernetes operator, or print what it would create.

``corral operator run`` starts the kopf operator (:mod:`corral.operator.handlers`) against the current
kubeconfig (``$KUBECONFIG`` / ``~/.kube/config``; in a pod, its service account)::

    kubectl apply --server-side -f manifests/crds/ -f manifests/third_party/kuberay/
    corral operator run --namespace default          # or --all-namespaces
    kubectl apply -f manifests/examples/

``--webhook`` also serves the validating admission webhook (the cross-object checks of ``corral
validate``; :mod:`corral.operator.admission`). ``--peering NAME`` runs it as one of several replicas
(kopf peering; ``kubectl apply -f manifests/third_party/kopf/`` first): one works, the others stand by
and take over when it stops answering.

``corral operator render -f manifests/examples/`` prints the RayService of each ModelPool (no cluster
needed; no ownerReference without a live uid).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "operator",
        help="Run the Kubernetes operator (ModelPool/RoutingPolicy -> KubeRay RayService).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="operator_command", metavar="SUBCOMMAND")
    run = sub.add_parser("run", help="start the operator against the current kubeconfig")
    ns = run.add_mutually_exclusive_group()
    ns.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)"
    )
    ns.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    run.add_argument(
        "--target", choices=["rayservice", "ray"], default="rayservice",
        help="default target for pools without a corral.dev/target annotation (default rayservice)",
    )  # fmt: skip
    run.add_argument(
        "--ray-address", default=None, metavar="URL",
        help="target ray: the Ray dashboard to PUT Serve configs to, e.g. http://127.0.0.1:8265",
    )  # fmt: skip
    run.add_argument(
        "--http-port", type=int, default=None, help="target ray: Serve's HTTP proxy port (default: Serve's)"
    )
    _rayservice_arguments(run)
    run.add_argument(
        "--peering", default=os.environ.get("CORRAL_OPERATOR_PEERING"), metavar="NAME",
        help="run as one of several replicas: kopf peering object NAME (created if absent; needs the "
        "CRDs in manifests/third_party/kopf/); the replica with the highest --priority works, the "
        "others wait (default: standalone; env CORRAL_OPERATOR_PEERING)",
    )  # fmt: skip
    run.add_argument(
        "--priority", type=int, default=None,
        help="peering priority (default: random, so replicas never tie; kopf pauses all tied peers)",
    )  # fmt: skip
    run.add_argument(
        "--peering-lifetime", type=int, default=30, metavar="S",
        help="seconds after its last keep-alive that a silent replica counts as dead (default 30)",
    )  # fmt: skip
    run.add_argument(
        "--webhook", action="store_true", default=_env_flag("CORRAL_OPERATOR_WEBHOOK"),
        help="serve the validating admission webhook (cross-object checks of `corral validate`) and "
        "register it (ValidatingWebhookConfiguration corral.dev); env CORRAL_OPERATOR_WEBHOOK=1",
    )  # fmt: skip
    run.add_argument(
        "--webhook-host", default="127.0.0.1",
        help="address or DNS name the apiserver reaches the webhook at (default 127.0.0.1)",
    )  # fmt: skip
    run.add_argument("--webhook-port", type=int, default=9443, help="webhook HTTPS port (default 9443)")
    run.add_argument("--webhook-listen", default=None, help="listening address (default: --webhook-host)")
    run.add_argument(
        "--webhook-certfile", default=None,
        help="TLS certificate (PEM; also the caBundle); default: a self-signed one for --webhook-host",
    )  # fmt: skip
    run.add_argument("--webhook-keyfile", default=None, help="its private key (PEM)")
    run.add_argument("--liveness", default=None, metavar="URL", help="e.g. http://0.0.0.0:8080/healthz")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=_run)
    render = sub.add_parser("render", help="print the RayService of each ModelPool in the files")
    render.add_argument("-f", "--filename", action="append", required=True, metavar="PATH")
    _rayservice_arguments(render)
    render.set_defaults(func=_render)
    p.set_defaults(func=lambda _a: _usage(p))
    return p


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _rayservice_arguments(p: argparse.ArgumentParser) -> None:
    from .translate import DEFAULT_IMAGE

    p.add_argument(
        "--image", default=DEFAULT_IMAGE, help=f"Ray image with corral installed ({DEFAULT_IMAGE})"
    )
    p.add_argument("--worker-cpu", default="8", help="CPU per engine pod (default 8)")
    p.add_argument("--worker-memory", default="64Gi", help="memory per engine pod (default 64Gi)")
    p.add_argument(
        "--serve-options", default=None, metavar="JSON",
        help='corral.serve.app.ServeOptions fields, e.g. \'{"router_grpc_port": 0}\'',
    )  # fmt: skip
    tls = "kubernetes.io/tls Secret (in the pool's namespace)"
    p.add_argument("--router-tls-secret", default=None, metavar="NAME",
                   help=f"{tls} for the routers' HTTPS and gRPC")  # fmt: skip
    p.add_argument("--router-client-auth", action="store_true",
                   help="routers require client certificates signed by that Secret's ca.crt")  # fmt: skip
    p.add_argument("--engine-tls-secret", default=None, metavar="NAME",
                   help=f"{tls} for router <-> engine mutual TLS")  # fmt: skip


def _options(args: argparse.Namespace) -> Any:
    import json

    from corral.serve.app import ServeOptions

    from .translate import RayServiceOptions

    serve = json.loads(args.serve_options) if args.serve_options else {}
    ServeOptions.from_dict(serve)  # unknown fields are an error now, not at the first reconcile
    return RayServiceOptions(
        image=args.image, worker_cpu=args.worker_cpu, worker_memory=args.worker_memory, serve=serve,
        router_tls_secret=args.router_tls_secret, router_client_auth=args.router_client_auth,
        engine_tls_secret=args.engine_tls_secret,
    )  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers

    handlers.CONFIG = handlers.OperatorConfig(
        target=args.target,
        rayservice=_options(args),
        ray_address=args.ray_address,
        http_options={"host": "127.0.0.1", "port": args.http_port} if args.http_port else None,
    )
    if args.webhook:
        from . import admission  # registers the validating handlers

        admission.CONFIG = admission.WebhookConfig(
            host=args.webhook_host,
            port=args.webhook_port,
            listen=args.webhook_listen,
            certfile=args.webhook_certfile,
            pkeyfile=args.webhook_keyfile,
        )
    priority = 0
    if args.peering:
        import random

        from .kube import ensure_peering

        try:
            ensure_peering(handlers.kube(), args.peering, args.namespace, clusterwide=args.all_namespaces)
        except RuntimeError as exc:
            print(f"corral operator: {exc}", file=sys.stderr)
            return 1
        priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
        handlers.PEERING_LIFETIME = args.peering_lifetime
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=not args.peering,
        peering_name=args.peering or None,
        priority=priority,
        clusterwide=bool(args.all_namespaces),
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    )
    return 0


def _docs(paths: list[str]) -> list[dict[str, Any]]:
    import yaml

    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        files += sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
    return [d for f in files for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]


def _render(args: argparse.Namespace) -> int:
    import yaml

    from .translate import ray_service

    docs = _docs(args.filename)
    policies = [d for d in docs if d.get("kind") == "RoutingPolicy"]
    out = []
    for pool in (d for d in docs if d.get("kind") == "ModelPool"):
        ns, name = pool["metadata"].get("namespace"), pool["metadata"]["name"]
        ref = (pool.get("spec") or {}).get("routingPolicyRef")
        policy = next(
            (
                p
                for p in policies
                if p["metadata"].get("namespace") == ns
                and (p["metadata"]["name"] == ref if ref else (p.get("spec") or {}).get("poolRef") == name)
            ),
            None,
        )
        try:
            out.append(ray_service(pool, policy, _options(args)))
        except ValueError as exc:
            print(f"corral operator: {exc}", file=sys.stderr)
            return 1
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 0
