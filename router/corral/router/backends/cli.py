"""``corral router``: a standalone router in front of OpenAI-compatible servers (vLLM, SGLang, ...).

::

    corral router --backend http://10.0.0.5:8000 --backend A100-80GB=http://10.0.0.6:8000 --policy rp.yaml
    corral router --service vllm --namespace llm --port http --policy rp.yaml     # EndpointSlices

Routes exactly as the deployed router does from the same RoutingPolicy (and ModelPool) files: strategy,
SLO, queue bound, block size, tenants, adapters and their sources (loaded on demand with
``/v1/load_lora_adapter``; ``adapterPaging``'s pins, replication and unloads run as on Corral's engines),
tokenizers. The prefix index is the router's own dispatch history
(``prefixIndex: approximate``) unless ``--kv-events-port`` reads vLLM's KV events from every backend (then
``precise`` works as with Corral's engines); without it, a policy asking for ``precise`` is run as
approximate, and the router says so when it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from ..engine_client import Discovery
from ..server.__main__ import _config, _param, _settings, install_uvloop
from ..server.__main__ import build_parser as server_parser
from ..signals import stop_on_signals
from .discovery import EndpointSliceDiscovery, StaticBackends


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "router",
        help="Run a standalone router in front of OpenAI-compatible servers (vLLM, SGLang).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure(p)
    p.set_defaults(func=run)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backends")
    g.add_argument("--backend", action="append", default=[], metavar="[CLASS=]URL", type=backend_spec,
                   help="an OpenAI-compatible server, http(s)://HOST[:PORT] or HOST:PORT (repeat); "
                   "CLASS = its GPU class for the cost model: a built-in profile (H100, A100-80GB, L4) or "
                   "a gpuClasses name of the --policy's ModelPool (default --gpu-class)")  # fmt: skip
    g.add_argument("--service", default=None, metavar="NAME",
                   help="discover backends from this Kubernetes Service's EndpointSlices")  # fmt: skip
    g.add_argument("--namespace", default="default", help="the Service's namespace (default: default)")
    g.add_argument("--port", default=None, help="the Service port's name or number (default: its first)")
    g.add_argument("--gpu-class", default="H100", help="GPU class of backends without one (default: H100)")
    g.add_argument("--scrape-interval", type=float, default=0.25,
                   help="seconds between /metrics scrapes per backend (default 0.25)")  # fmt: skip
    g.add_argument("--fail-threshold", type=int, default=2,
                   help="consecutive failed probes that eject a backend (default 2)")  # fmt: skip
    g.add_argument("--kv-events-port", type=int, default=None, metavar="PORT",
                   help="read vLLM's KV events (ZMQ publisher, --kv-events-config) on each backend's host at "
                   "this port: a precise prefix index (needs pyzmq: corral[kv-events])")  # fmt: skip
    g.add_argument("--kv-events-topic", default="", help="the publishers' topic (default: all)")
    g.add_argument("--backend-api-key-file", default=None, metavar="FILE",
                   help="a file holding the backends' API key (vLLM --api-key), sent as 'Authorization: "
                   "Bearer'; default: $CORRAL_BACKEND_API_KEY")  # fmt: skip
    r = p.add_argument_group("routing")
    r.add_argument("--policy", "-f", dest="routing_policy", action="append", default=[], metavar="FILE",
                   help="RoutingPolicy (and its ModelPool) YAML file or folder, as `corral validate` reads "
                   "it (default: the CRD defaults, with the approximate prefix index unless "
                   "--kv-events-port is given)")  # fmt: skip
    r.add_argument("--strategy", dest="policy", default=None, help="override the policy's strategy")
    r.add_argument("--policy-param", action="append", type=_param, default=[], metavar="KEY=VALUE")
    r.add_argument("--tokenizer", action="append", type=_param, default=[], metavar="MODEL=PATH",
                   help="tokenizer.json (or its folder) for a model: use the served model's, so prefix "
                   "blocks and chat templates match (default: spec.models[].tokenizer, else 4 bytes a "
                   "token)")  # fmt: skip
    r.add_argument("--api-keys", default=None, help="tenants' API key file")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 = any free)")
    s.add_argument("--grpc-port", type=int, default=50050, help="gRPC port (default 50050; 0 = any free)")
    s.add_argument("--no-uvloop", action="store_true")
    s.add_argument("--log-level", default="INFO")
    p.set_defaults(index_mode=None, stale_after=1.0)


def backend_spec(spec: str) -> str:
    """``--backend``'s ``[CLASS=]URL``, refused at parsing unless the URL is http(s) with a host (and a port
    when the scheme is left out: ``HOST:PORT``)."""
    cls, sep, url = spec.partition("=")
    if not sep or "://" in cls:
        cls, url = "", spec
    url = url.strip()
    if sep and not cls.strip() and "://" not in spec.partition("=")[0]:
        raise argparse.ArgumentTypeError(f"{spec!r}: empty GPU class before '='")
    if not url:
        raise argparse.ArgumentTypeError(f"{spec!r}: no URL (expected [CLASS=]http://HOST:PORT)")
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    if "://" in url and parsed.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{spec!r}: scheme '{parsed.scheme}' (only http and https)")
    try:
        port = parsed.port
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: bad port") from None
    if not parsed.hostname:
        raise argparse.ArgumentTypeError(f"{spec!r}: no host (expected [CLASS=]http://HOST:PORT)")
    if "://" not in url and port is None:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: not a URL (expected [CLASS=]http://HOST:PORT or HOST:PORT)"
        )
    return spec


def check_gpu_classes(ns: argparse.Namespace, profiles: Mapping[str, object]) -> None:
    """Every backend's GPU class (and --gpu-class) is a pool gpuClasses name or a built-in profile."""
    from corral.api.profiles import BUILTIN_PROFILES, UnknownProfileError, resolve_profile

    classes = {ns.gpu_class} | {s.partition("=")[0] for s in ns.backend if "://" not in s.partition("=")[0]}
    classes.discard("")
    for c in sorted(classes):
        if c in profiles:
            continue
        try:
            resolve_profile(c)
        except UnknownProfileError:
            known = ", ".join([*BUILTIN_PROFILES, *(p for p in profiles if p not in BUILTIN_PROFILES)])
            raise ValueError(
                f"unknown GPU class '{c}' (--backend CLASS=URL / --gpu-class): known profiles: {known} "
                "(or declare it in the --policy's ModelPool spec.gpuClasses)"
            ) from None


def asks_precise(paths: list[str]) -> bool:
    """Whether a RoutingPolicy in ``paths`` sets ``spec.prefixIndex: precise`` itself (not by default)."""
    from corral.api.routingpolicy import RoutingPolicy
    from corral.api.validation import validate_paths

    return any(
        isinstance(o, RoutingPolicy)
        and "prefix_index" in o.spec.model_fields_set
        and o.spec.prefix_index == "precise"
        for o in validate_paths(paths).objects
    )


def discovery_of(ns: argparse.Namespace) -> Discovery:
    if ns.service and ns.backend:
        raise ValueError("give either --backend URL ... or --service NAME, not both")
    if ns.service:
        port: str | int | None = int(ns.port) if ns.port and ns.port.isdigit() else ns.port
        return EndpointSliceDiscovery(ns.service, ns.namespace, port, gpu_class=ns.gpu_class)
    if not ns.backend:
        raise ValueError("no backends: give --backend URL (repeatable) or --service NAME")
    return StaticBackends(ns.backend)


def run(ns: argparse.Namespace) -> int:
    from ..server.app import RouterServer
    from .paging import BackendPaging
    from .pool import BackendPool

    logging.basicConfig(level=ns.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        disc = discovery_of(ns)
        settings = _settings(ns.routing_policy)
        check_gpu_classes(ns, settings.profiles)
        backend_key = os.environ.get("CORRAL_BACKEND_API_KEY") or None
        if ns.backend_api_key_file:
            backend_key = Path(ns.backend_api_key_file).read_text().strip() or None
        full = server_parser().parse_args([])  # every option of the engine router at its default ...
        vars(full).update(vars(ns))  # ... with this command's values
        cfg = _config(full)
    except (OSError, ValueError) as e:
        print(f"corral router: {e}", file=sys.stderr)
        return 2
    if ns.kv_events_port:
        try:
            import msgpack  # noqa: F401
            import zmq  # noqa: F401
        except ImportError as e:
            print(f"corral router: --kv-events-port needs {e.name}: pip install 'corral[kv-events]'",
                  file=sys.stderr)  # fmt: skip
            return 2
    elif cfg.index_mode == "precise":
        if ns.routing_policy and asks_precise(ns.routing_policy):
            print("corral router: the RoutingPolicy's prefixIndex is 'precise' (engine KV events) but no "
                  "--kv-events-port is given, so the index is 'approximate' (this router's own dispatches)",
                  file=sys.stderr)  # fmt: skip
        cfg.index_mode = "approximate"
        settings = replace(settings, index_mode="approximate")
    if not ns.no_uvloop:
        install_uvloop()

    async def main() -> int:
        try:  # one listing before anything listens: a wrong Service or no cluster access is one line
            first = list(await disc.endpoints())
        except Exception as e:
            print(f"corral router: cannot list the backends ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        paging: list[BackendPaging] = []  # the pager needs the pool the server makes
        server = RouterServer(
            disc, cfg, lambda rid, req: paging[0].on_dispatch(rid, req) if paging else None,
            pool_cls=BackendPool, gpu_class=ns.gpu_class, block_size=settings.block_size,
            scrape_interval_s=ns.scrape_interval, fail_threshold=ns.fail_threshold,
            profiles=settings.profiles, kv_events_port=ns.kv_events_port, kv_events_topic=ns.kv_events_topic,
            api_key=backend_key, declared_models=list(settings.models),
        )  # fmt: skip
        try:
            await server.start(ns.host, ns.grpc_port, ns.http_port)
        except OSError as e:
            await server.stop(0)
            print(f"corral router: cannot listen on {ns.host} (HTTP port {ns.http_port}, gRPC port "
                  f"{ns.grpc_port}): {e.strerror or e}; pick free ports with --http-port/--grpc-port "
                  "(0 = any)", file=sys.stderr)  # fmt: skip
            return 2
        paging.append(BackendPaging(server.router.pool, settings))  # adapterPaging: pins, demand, unloads
        paging[0].start()
        print(f"corral router: http {server.http_url}  grpc {server.grpc_address}  policy {cfg.policy}  "
              f"backends: {', '.join(first) or '(none yet)'}", flush=True)  # fmt: skip
        stop = stop_on_signals()
        await stop.wait()
        await paging[0].stop()
        await server.stop()
        return 0

    return asyncio.run(main())
