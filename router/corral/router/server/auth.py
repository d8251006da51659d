"""Tenant API keys: the key file (digests only), its parser, live reload, roles and model access.

The key file (YAML or JSON; the router's ``--api-keys FILE``, or the RoutingPolicy's ``spec.tenants``
Secret mounted into the router pods) holds **SHA-256 digests**, never keys::

    keys:                        # one entry per key (make them with `corral keys add FILE --tenant T`)
      - tenant: acme
        key: sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
        role: inference          # inference (default): the OpenAI / gRPC inference API
      - tenant: ops
        key: sha256:...
        role: admin              # admin: inference too, plus Explain and /metrics
    tenants:                     # optional: what each tenant may use (default: every public model)
      acme:
        models: [llama-8b, "sql-*"]   # model / adapter names or fnmatch patterns

This is the one place where tenant -> allowed models lives. Who *owns* a private adapter is the ModelPool's
``spec.adapters[].tenant``: only that tenant's keys can use it or see it in ``/v1/models``; for every other
tenant it does not exist (404). Keys are random tokens (``corral keys add`` makes 256-bit ones), so an
unsalted SHA-256 is a sound verifier (as for GitHub's tokens); a presented key is hashed, the digest is
looked up, and the stored digest is checked with :func:`hmac.compare_digest`.

:class:`KeyStore` re-reads the file when it changes (mtime, inode or size, checked at most every
``poll_s`` on the request path: a Kubernetes Secret update swaps the mounted file), so keys are added and
revoked without a restart; a file that turns malformed keeps the previous keys and logs the error with its
line. Nothing here logs a key, a digest or a prompt.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from corral.api.common import TENANT_PATTERN

log = logging.getLogger(__name__)

Role = Literal["inference", "admin"]
ROLES: tuple[Role, ...] = ("inference", "admin")
DIGEST_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TENANT_RE = re.compile(TENANT_PATTERN)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~7x faster on big key files


class KeyFileError(ValueError):
    """A malformed key file: the message names the file and the line."""


def hash_key(key: str) -> str:
    """The stored form of an API key: ``sha256:<hex>``."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return "sk-corral-" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a key belongs to: its tenant and role."""

    tenant: str
    role: Role = "inference"

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class KeyTable:
    """A parsed key file: digest -> principal, and tenant -> allowed model patterns (absent: any public)."""

    def __init__(
        self,
        principals: Mapping[str, Principal] | None = None,
        models: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.principals: dict[str, Principal] = dict(principals or {})
        self.models: dict[str, tuple[str, ...]] = dict(models or {})
        self._stored = {d.encode(): (d.encode(), p) for d, p in self.principals.items()}

    def lookup(self, key: str) -> Principal | None:
        """The principal of a presented key, or None. The key is hashed first (so no timing depends on the
        secret itself), the digest looked up, and the stored digest compared in constant time."""
        digest = hash_key(key).encode()
        hit = self._stored.get(digest)
        if hit is not None and hmac.compare_digest(hit[0], digest):
            return hit[1]
        return None

    def allows(self, tenant: str, name: str) -> bool:
        pats = self.models.get(tenant)
        return pats is None or any(fnmatch.fnmatchcase(name, p) for p in pats)

    @property
    def tenants(self) -> set[str]:
        return {p.tenant for p in self.principals.values()}


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _scalar(node: yaml.Node, where: str, origin: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.value == "":
        raise KeyFileError(f"{origin}:{_line(node)}: {where}: expected a non-empty string")
    return str(node.value)


def _mapping(node: yaml.Node, where: str, origin: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise KeyFileError(f"{origin}:{_line(node)}: {where}: expected a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for k, v in node.value:
        name = _scalar(k, where, origin)
        if name in out:
            raise KeyFileError(f"{origin}:{_line(k)}: {where}: duplicate field '{name}'")
        out[name] = (k, v)
    return out


def _digest(node: yaml.Node, where: str, origin: str) -> str:
    value = _scalar(node, where, origin)
    if not _DIGEST_RE.match(value):
        # never echo the value: it may be a plain key pasted by mistake
        raise KeyFileError(
            f"{origin}:{_line(node)}: {where}: not a key digest 'sha256:<64 lower-case hex>' (the file "
            "stores digests, never keys: make an entry with `corral keys add FILE --tenant T` or "
            "`corral keys hash`)"
        )
    return value


def _tenant(node: yaml.Node, where: str, origin: str) -> str:
    value = _scalar(node, where, origin)
    if not _TENANT_RE.match(value):
        raise KeyFileError(
            f"{origin}:{_line(node)}: {where}: tenant name must be 1-63 letters, digits, '.', '_' or '-' "
            f"(got {value!r})"
        )
    return value


def parse_key_file(text: str, origin: str = "<keys>") -> KeyTable:
    """Parse a key file (see the module docstring). Raises :class:`KeyFileError` naming the line."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML/JSON"
        raise KeyFileError(f"{origin}{at}: {problem}") from None
    if root is None:
        raise KeyFileError(f"{origin}:1: empty key file: expected 'keys:' (a list of tenant/key/role)")
    top = _mapping(root, "top level", origin)
    principals: dict[str, Principal] = {}
    models: dict[str, tuple[str, ...]] = {}
    if "keys" not in top:
        # the short form: a map 'sha256:<hex>: tenant' (inference keys)
        for name, (k, v) in top.items():
            if name == "tenants":
                continue
            principals[_digest(k, "key", origin)] = Principal(_tenant(v, f"key at line {_line(k)}", origin))
    else:
        for name, (k, _v) in top.items():
            if name not in ("keys", "tenants"):
                raise KeyFileError(f"{origin}:{_line(k)}: unknown field '{name}' (expected keys, tenants)")
        knode = top["keys"][1]
        if not isinstance(knode, yaml.SequenceNode):
            raise KeyFileError(f"{origin}:{_line(knode)}: keys: expected a list of tenant/key/role entries")
        for i, entry in enumerate(knode.value):
            where = f"keys[{i}]"
            fields = _mapping(entry, where, origin)
            for name, (k, _v) in fields.items():
                if name not in ("tenant", "key", "role"):
                    raise KeyFileError(
                        f"{origin}:{_line(k)}: {where}: unknown field '{name}' (expected tenant, key, role)"
                    )
            for need in ("tenant", "key"):
                if need not in fields:
                    raise KeyFileError(f"{origin}:{_line(entry)}: {where}: missing field '{need}'")
            digest = _digest(fields["key"][1], f"{where}.key", origin)
            role: str = "inference"
            if "role" in fields:
                role = _scalar(fields["role"][1], f"{where}.role", origin)
                if role not in ROLES:
                    raise KeyFileError(
                        f"{origin}:{_line(fields['role'][1])}: {where}.role: must be one of "
                        f"{', '.join(ROLES)} (got {role!r})"
                    )
            if digest in principals:
                raise KeyFileError(f"{origin}:{_line(fields['key'][1])}: {where}.key: the same key twice")
            principals[digest] = Principal(_tenant(fields["tenant"][1], f"{where}.tenant", origin), role)  # type: ignore[arg-type]
    if "tenants" in top:
        for tname, (k, v) in _mapping(top["tenants"][1], "tenants", origin).items():
            where = f"tenants.{tname}"
            _tenant(k, where, origin)
            tf = _mapping(v, where, origin)
            for name, (fk, _fv) in tf.items():
                if name != "models":
                    msg = f"{where}: unknown field '{name}' (expected models)"
                    raise KeyFileError(f"{origin}:{_line(fk)}: {msg}")
            if "models" in tf:
                mnode = tf["models"][1]
                if not isinstance(mnode, yaml.SequenceNode):
                    raise KeyFileError(f"{origin}:{_line(mnode)}: {where}.models: expected a list of names")
                models[tname] = tuple(
                    _scalar(n, f"{where}.models[{j}]", origin) for j, n in enumerate(mnode.value)
                )
    return KeyTable(principals, models)


def load_key_file(path: str | Path) -> KeyTable:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not UTF-8 text") from None
    return parse_key_file(text, str(path))


def _signature(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # follows the symlinks of a mounted Secret (..data swap on update)
    return st.st_mtime_ns, st.st_ino, st.st_size


class KeyStore:
    """The router's API keys: a :class:`KeyTable`, re-read from ``path`` when the file changes."""

    def __init__(
        self,
        table: KeyTable,
        path: str | Path | None = None,
        poll_s: float = 1.0,
        background: bool = True,
    ) -> None:
        self.table = table
        self.path = Path(path) if path is not None else None
        self.poll_s = poll_s
        # a changed file is parsed in a thread (10,000 keys: 0.5-1.2 s, corral bench security), never on the
        # request path: the previous keys stay in force until the new ones are ready
        self.background = background
        self._reloading = False
        self.reloads = 0
        self.last_error: str | None = None
        self._sig: tuple[int, int, int] | None = None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, poll_s: float = 1.0, background: bool = True) -> KeyStore:
        """Load ``path`` (raises :class:`KeyFileError` / ``OSError``) and watch it."""
        p = Path(path)
        sig = _signature(p)
        store = cls(load_key_file(p), p, poll_s, background)
        store._sig = sig
        return store

    @classmethod
    def from_keys(cls, keys: Mapping[str, str] | Iterable[tuple[str, str, Role]]) -> KeyStore:
        """From plain keys in memory (tests, embedding): ``{key: tenant}`` or ``[(key, tenant, role)]``."""
        items = [(k, t, "inference") for k, t in keys.items()] if isinstance(keys, Mapping) else list(keys)
        return cls(KeyTable({hash_key(k): Principal(t, r) for k, t, r in items}))  # type: ignore[arg-type]

    def maybe_reload(self, force: bool = False) -> bool:
        """Re-read the file now if it changed (``force``: even within ``poll_s`` of the last check); True
        when new keys took effect."""
        sig = self._changed(force)
        return sig is not None and self._load(sig)

    def _changed(self, force: bool) -> tuple[int, int, int] | None:
        """The file's new signature when it changed since the last load (checked at most every poll_s)."""
        if self.path is None:
            return None
        now = time.monotonic()
        if not force and now - self._checked < self.poll_s:
            return None
        self._checked = now
        try:
            sig = _signature(self.path)
        except OSError as e:  # a Secret update briefly swaps the link: keep the keys we have
            self._fail(f"{self.path}: {e.strerror or e}")
            return None
        return None if sig == self._sig else sig

    def _load(self, sig: tuple[int, int, int]) -> bool:
        assert self.path is not None
        with self._lock:
            if sig == self._sig:
                return False
            try:
                table = load_key_file(self.path)
            except (KeyFileError, OSError) as e:
                self._sig = sig  # report each bad version once; a fix changes the signature again
                self._fail(str(e))
                return False
            self.table, self._sig = table, sig
            self.reloads += 1
            self.last_error = None
            log.info("API keys reloaded from %s: %d keys, %d tenants", self.path, len(table.principals),
                     len(table.tenants))  # fmt: skip
            return True

    def _background_load(self, sig: tuple[int, int, int]) -> None:
        try:
            self._load(sig)
        finally:
            self._reloading = False

    def _fail(self, msg: str) -> None:
        if msg != self.last_error:
            log.error("API keys not reloaded, keeping the previous ones: %s", msg)
        self.last_error = msg

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key`` under the keys in force (a changed file is picked up within poll_s plus
        its parse time)."""
        if not self._reloading:
            sig = self._changed(False)
            if sig is not None:
                if self.background:
                    self._reloading = True
                    try:
                        threading.Thread(target=self._background_load, args=(sig,), name="corral-keys-reload",
                                         daemon=True).start()  # fmt: skip
                    except RuntimeError:  # no thread to be had (interpreter shutting down): load here
                        self._reloading = False
                        self._load(sig)
                else:
                    self._load(sig)
        return self.table.lookup(key)

    def allows(self, tenant: str, name: str) -> bool:
        return self.table.allows(tenant, name)


def append_key(path: str | Path, tenant: str, role: Role = "inference", key: str | None = None) -> str:
    """Add a key for ``tenant`` to the key file at ``path`` (created if missing; written atomically so a
    watching router never reads half a file); returns the plain key (shown once, never stored)."""
    p = Path(path)
    if not _TENANT_RE.match(tenant):
        raise KeyFileError(f"tenant name must be 1-63 letters, digits, '.', '_' or '-' (got {tenant!r})")
    if role not in ROLES:
        raise KeyFileError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
    key = key or new_key()
    data: dict[str, object] = {"keys": []}
    if p.exists():
        text = p.read_text(encoding="utf-8")
        parse_key_file(text, str(p))  # refuse to touch a malformed file
        loaded = yaml.safe_load(text)
        if "keys" not in loaded:  # the short form: convert
            loaded = {
                "keys": [
                    {"tenant": t, "key": d, "role": "inference"} for d, t in loaded.items() if d != "tenants"
                ],
                **({"tenants": loaded["tenants"]} if "tenants" in loaded else {}),
            }
        data = loaded
    entries = data.setdefault("keys", [])
    assert isinstance(entries, list)
    entries.append({"tenant": tenant, "key": hash_key(key), "role": role})
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, p)
    return key


# ---- access to models (used by the router's request path and /v1/models) ---------------------------------


def check_model_access(
    store: KeyStore | None, owners: Mapping[str, str], tenant: str | None, model: str, adapter: str | None
) -> None:
    """Raise unless ``tenant`` (None: auth is off) may use ``model`` (an adapter when ``adapter`` is set).
    Another tenant's private adapter does not exist for this one (404); a model outside the tenant's
    ``models`` is 403; a private adapter on a router without keys is 403 for everyone."""
    from .errors import Forbidden, NotFound

    owner = owners.get(adapter) if adapter else None
    if owner is not None:
        if store is None:
            raise Forbidden(
                f"adapter '{model}' is private to a tenant (ModelPool spec.adapters[].tenant) and this "
                "router has no API keys (RoutingPolicy spec.tenants): it serves it to nobody"
            )
        if tenant != owner:
            raise NotFound(f"model '{model}' not found")
    if store is not None and tenant is not None and not store.allows(tenant, model):
        allowed = ", ".join(store.table.models.get(tenant, ()))
        raise Forbidden(
            f"tenant '{tenant}' may not use model '{model}' (its API key file entry tenants.{tenant}.models "
            f"allows: {allowed or 'nothing'})"
        )


def visible(store: KeyStore | None, owners: Mapping[str, str], tenant: str | None, name: str) -> bool:
    """Whether ``name`` (a model or adapter) is listed for ``tenant`` (in /v1/models, error hints)."""
    owner = owners.get(name)
    if owner is not None and (store is None or owner != tenant):
        return False
    return store is None or tenant is None or store.allows(tenant, name)
