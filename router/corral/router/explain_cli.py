"""``corral explain``: ask a running router (gRPC ``Explain``) why a request went where it did, or dry-run
a prompt, and print the decision with every candidate's cost terms (queue, prefill, adapter load) and, when
the policy's model selection chose the model, its signals, rule and bandit scores."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .explain import format_decision
from .selection.audit import format_selection
from .types import Decision


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain", help="Explain a routing decision and its cost terms.", description=__doc__
    )
    p.add_argument("--router", required=True, metavar="HOST:PORT",
                   help="the router's gRPC address, e.g. 127.0.0.1:50050 (its --grpc-port; not the HTTP "
                   "port, not a URL)")  # fmt: skip
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--request-id", help="a recent request's id (the router keeps a bounded history)")
    what.add_argument("--prompt", help="dry-run this prompt (nothing is sent to an engine)")
    p.add_argument("--model", help="model or adapter name for --prompt")
    p.add_argument("--api-key", help="an admin API key (role admin), when the router requires keys")
    p.add_argument("--ca", help="TLS: the CA that signed the router's certificate (default: plaintext)")
    p.add_argument("--cert", help="TLS: client certificate, for a router that requires one (mTLS)")
    p.add_argument("--key", help="TLS: the private key of --cert")
    p.add_argument("--json", action="store_true", help="print the raw decision as JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import grpc
    from corral.v1 import router_pb2 as rpb
    from corral.v1 import router_pb2_grpc as rpb_grpc

    from .wire import decision_from_pb

    if "://" in args.router:
        print(f"error: --router {args.router}: give the router's gRPC address HOST:PORT (its --grpc-port, "
              "default 50050), not a URL", file=sys.stderr)  # fmt: skip
        return 2
    if args.prompt is not None and not args.model:
        print("error: --prompt needs --model (a base model or adapter name)", file=sys.stderr)
        return 2
    req = (
        rpb.ExplainRequest(request_id=args.request_id)
        if args.request_id
        else rpb.ExplainRequest(request=rpb.CompletionRequest(model=args.model, prompt=args.prompt))
    )
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    if args.ca or args.cert or args.key:
        from .tls import ClientTls, TlsConfigError

        try:
            creds = ClientTls(args.ca, args.cert, args.key).grpc_credentials()
        except TlsConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        channel = grpc.secure_channel(args.router, creds)
    else:
        channel = grpc.insecure_channel(args.router)
    with channel as ch:
        try:
            resp = rpb_grpc.RouterStub(ch).Explain(req, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as e:
            print(f"error: router {args.router}: {_rpc_error(e, bool(args.api_key))}", file=sys.stderr)
            return 1
    d = decision_from_pb(resp)
    if args.json:
        out = {"request_id": resp.request_id, "dry_run": resp.dry_run, **_as_dict(d)}
        if resp.HasField("selection"):  # model selection (spec.modelSelection)
            from google.protobuf.json_format import MessageToDict

            out["selection"] = MessageToDict(resp.selection, preserving_proto_field_name=True)
        print(json.dumps(out, indent=2))
    else:
        kind = "dry run" if resp.dry_run else f"request {resp.request_id}"
        print(f"{kind}: {resp.prompt_tokens} prompt tokens, {resp.prompt_blocks} blocks")
        if resp.attempts:
            print("attempts: " + " -> ".join(resp.attempts))
        if resp.HasField("selection"):
            print(format_selection(resp.selection))
        print(format_decision(d))
    return 0


def _rpc_error(e: Any, has_key: bool) -> str:
    """A gRPC error as one line that says what to change."""
    import grpc

    code = e.code()
    details = str(e.details() or "")
    text = f"{code.name if code else 'UNKNOWN'}: {details}"
    if "HTTP/2" in details or "SETTINGS frame" in details or "Trying to connect an http1" in details:
        return (f"{text} -- this address looks like an HTTP port: --router takes the router's gRPC "
                "address (its --grpc-port, default 50050)")  # fmt: skip
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) and not has_key:
        return f"{text} -- this router requires an API key: give an admin key with --api-key"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"{text} -- Explain needs a key of role admin (--api-key; see corral keys add --role admin)"
    return text


def _as_dict(d: Decision) -> dict[str, object]:
    from dataclasses import asdict

    return asdict(d)
