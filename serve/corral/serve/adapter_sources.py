"""Adapter sources: parse an adapter's source URI and fetch its weights into a local, validated directory.

``ModelPool.spec.adapters[].source`` names the weights: ``file:///abs/dir`` (or a single ``.safetensors``
file), ``s3://bucket/prefix`` or ``hf://org/repo[@revision]``. :func:`parse_source` checks the shape of
the URI; :func:`fetch_adapter` resolves ``file://`` sources (parsing each safetensors header, copying the
files into a cache keyed by their digest so engines never read a file that changes under them). ``s3://``
and ``hf://`` are parsed but reported as :class:`AdapterNotFetchable` (no credentials or network here).

The engines (vLLM wrapper) and local mode call this; the router only passes the URI along.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse


class AdapterSourceError(ValueError):
    """An adapter source URI is malformed, missing, or not a valid safetensors adapter."""


class AdapterNotFetchable(AdapterSourceError):
    """The URI is well formed but its scheme cannot be fetched in this environment."""


@dataclass(frozen=True, slots=True)
class AdapterSource:
    """A parsed adapter source: ``file:///abs/dir``, ``s3://bucket/key``, ``hf://org/repo[@rev]``."""

    scheme: Literal["file", "s3", "hf"]
    location: str  # absolute path (file), "bucket/key" (s3), "org/repo" (hf)
    revision: str | None = None
    uri: str = ""


def parse_source(uri: str) -> AdapterSource:
    """Parse an adapter source URI; raise :class:`AdapterSourceError` when it is malformed."""
    if not uri or "://" not in uri:
        raise AdapterSourceError(f"adapter source {uri!r} is not a URI (expected file://, s3:// or hf://)")
    u = urlparse(uri)
    scheme = u.scheme.lower()
    if scheme == "file":
        if u.netloc not in ("", "localhost"):
            raise AdapterSourceError(
                f"file:// URI {uri!r} names host {u.netloc!r}; use file:///absolute/path"
            )
        path = unquote(u.path)
        if not path.startswith("/"):
            raise AdapterSourceError(f"file:// URI {uri!r} must hold an absolute path")
        return AdapterSource("file", path, uri=uri)
    if scheme == "s3":
        key = u.path.lstrip("/")
        if not u.netloc or not key:
            raise AdapterSourceError(f"s3 URI {uri!r} must look like s3://bucket/prefix")
        return AdapterSource("s3", f"{u.netloc}/{key}", uri=uri)
    if scheme == "hf":
        repo, _, rev = (u.netloc + u.path).partition("@")
        parts = [p for p in repo.split("/") if p]
        if len(parts) != 2:
            raise AdapterSourceError(f"hf URI {uri!r} must look like hf://org/repo[@revision]")
        return AdapterSource("hf", "/".join(parts), revision=rev or None, uri=uri)
    raise AdapterSourceError(f"adapter source {uri!r}: unsupported scheme {u.scheme!r} (file, s3, hf)")


@dataclass(frozen=True, slots=True)
class AdapterArtifact:
    """A fetched, validated adapter directory (vLLM's ``lora_path`` shape)."""

    name: str
    path: Path
    size_bytes: int
    tensors: int
    rank: int | None
    digest: str


_WEIGHTS_NAME = "adapter_model.safetensors"


def _validate_safetensors(path: Path) -> tuple[int, int | None]:
    """Open the header of a safetensors file; return (tensor count, LoRA rank if inferable)."""
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - safetensors ships with the [serve] extra
        raise AdapterSourceError("reading adapters needs the 'safetensors' package (corral[serve])") from e
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            rank = None
            for k in keys:
                if "lora_A" in k:
                    shape = f.get_slice(k).get_shape()
                    rank = int(shape[0]) if shape else None
                    break
    except Exception as e:
        raise AdapterSourceError(f"{path} is not a valid safetensors file: {e}") from e
    if not keys:
        raise AdapterSourceError(f"{path} holds no tensors")
    return len(keys), rank


def fetch_adapter(name: str, uri: str, cache_dir: str | Path) -> AdapterArtifact:
    """Resolve an adapter source into a local, validated directory under ``cache_dir``.

    ``file://`` may name a directory (holding ``*.safetensors`` and optionally ``adapter_config.json``)
    or a single ``.safetensors`` file. The files are validated (safetensors header parsed, at least one
    tensor) and copied into ``cache_dir/<name>-<digest>/`` so engines never read a file that changes
    under them; a repeat fetch of unchanged weights reuses the cached copy.
    """
    src = parse_source(uri)
    if src.scheme != "file":
        raise AdapterNotFetchable(
            f"adapter {name!r}: {src.scheme}:// sources ({uri}) are not fetchable here; "
            f"stage the weights locally and use file:///path/to/adapter"
        )
    p = Path(src.location)
    if not p.exists():
        raise AdapterSourceError(f"adapter {name!r}: {uri} does not exist")
    if p.is_dir():
        weights = sorted(p.glob("*.safetensors"))
        extras = [q for q in (p / "adapter_config.json",) if q.is_file()]
    elif p.suffix == ".safetensors":
        weights, extras = [p], []
    else:
        raise AdapterSourceError(f"adapter {name!r}: {uri} is neither a directory nor a .safetensors file")
    if not weights:
        raise AdapterSourceError(f"adapter {name!r}: no .safetensors file in {p}")

    h = hashlib.sha256()
    tensors, rank, size = 0, None, 0
    for w in [*weights, *extras]:
        data = w.read_bytes()
        h.update(w.name.encode() + b"\0" + data)
        size += len(data)
    for w in weights:
        try:
            n, r = _validate_safetensors(w)
        except AdapterSourceError as e:
            raise AdapterSourceError(f"adapter {name!r}: {e}") from None
        tensors += n
        rank = rank or r
    digest = h.hexdigest()[:16]
    dest = Path(cache_dir) / f"{name}-{digest}"
    if not dest.exists():
        tmp = dest.with_name(dest.name + f".tmp{time.monotonic_ns()}")
        tmp.mkdir(parents=True)
        for w in weights:
            target = _WEIGHTS_NAME if len(weights) == 1 else w.name
            shutil.copyfile(w, tmp / target)
        for x in extras:
            shutil.copyfile(x, tmp / x.name)
        try:
            tmp.rename(dest)
        except OSError:  # a concurrent fetch won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return AdapterArtifact(name=name, path=dest, size_bytes=size, tensors=tensors, rank=rank, digest=digest)
