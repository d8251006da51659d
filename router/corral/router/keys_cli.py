"""``corral keys``: make and check tenant API key files (the router stores digests, never keys).

::

    corral keys add keys.yaml --tenant acme [--role admin]   # appends a digest entry, prints the new key once
    corral keys hash < key.txt                               # a key's digest (stdin: not in shell history)
    corral keys check keys.yaml                              # parse as the router does (errors name the line)

The file format is described in :mod:`corral.router.server.auth`; put it into the RoutingPolicy's
``spec.tenants.secretRef`` Secret with ``kubectl create secret generic NAME --from-file=api-keys=keys.yaml``.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Make and check tenant API key files. The router stores SHA-256 digests, never keys.

  corral keys add keys.yaml --tenant acme [--role admin]   append a digest entry, print the new key once
  corral keys hash < key.txt                               a key's digest (stdin: not in shell history)
  corral keys check keys.yaml                              parse as the router does (errors name the line)

Key file (YAML or JSON):

  keys:                          one entry per key
    - tenant: acme
      key: sha256:<64 hex digits>
      role: inference            inference (default) or admin (also Explain and /metrics)
  tenants:                       optional: what each tenant may use (default: every public model)
    acme:
      models: [llama-8b, "sql-*"]   model / adapter names or fnmatch patterns

Give it to a standalone router with --api-keys FILE, or to the deployed router through the
RoutingPolicy's spec.tenants.secretRef Secret:
  kubectl create secret generic NAME --from-file=api-keys=keys.yaml
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("keys", help="Make and check tenant API key files.", description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="add a new key for a tenant to FILE (created if missing); print the key")
    add.add_argument("file", metavar="FILE")
    add.add_argument("--tenant", required=True)
    add.add_argument("--role", choices=["inference", "admin"], default="inference",
                     help="inference (default) or admin (inference + Explain and /metrics)")  # fmt: skip
    add.set_defaults(func=_add)
    h = sub.add_parser("hash", help="print the digest of a key (read from stdin unless given)")
    h.add_argument("key", nargs="?", default=None)
    h.set_defaults(func=_hash)
    c = sub.add_parser("check", help="parse FILE as the router does")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(func=_check)
    return p


def _add(args: argparse.Namespace) -> int:
    from .server.auth import KeyFileError, append_key

    try:
        key = append_key(args.file, args.tenant, args.role)
    except (KeyFileError, OSError) as e:
        print(f"corral keys: {e}", file=sys.stderr)
        return 1
    print(key)
    print(f"(added to {args.file} as a digest for tenant '{args.tenant}', role {args.role}; the key is "
          "shown only now)", file=sys.stderr)  # fmt: skip
    return 0


def _hash(args: argparse.Namespace) -> int:
    from .server.auth import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    if not key:
        print("corral keys hash: no key given (pass it, or one line on stdin)", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def _check(args: argparse.Namespace) -> int:
    from .server.auth import KeyFileError, load_key_file

    try:
        t = load_key_file(args.file)
    except (KeyFileError, OSError) as e:
        print(f"corral keys: {e}", file=sys.stderr)
        return 1
    roles = sorted({p.role for p in t.principals.values()})
    print(f"{args.file}: {len(t.principals)} keys, {len(t.tenants)} tenants, roles: {', '.join(roles)}")
    return 0
