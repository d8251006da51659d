"""The one tokenizer interface of router, engines and benchmarks.

:class:`Tokenizer` is what the router tokenizes prompts with, so that its chained block hashes
(:mod:`corral.router.hashing`) line up with the blocks the engine caches. Two implementations:

- :class:`HFTokenizer`: a Hugging Face *fast* tokenizer (the ``tokenizers`` package, no ``transformers``)
  loaded from a ``tokenizer.json``, with the chat template, ``bos_token`` and ``eos_token`` of an optional
  ``tokenizer_config.json`` next to it (or a ``chat_template.jinja`` file). The template is rendered the
  way Hugging Face renders it: Jinja2 in a sandboxed environment (``trim_blocks``, ``lstrip_blocks``),
  with ``messages``, ``add_generation_prompt=True``, the special tokens, ``raise_exception`` and
  ``strftime_now``.
- :class:`ByteTokenizer`: the simulator's cheap stand-in (UTF-8 bytes, ``bytes_per_token`` to an id;
  4 bytes a token is close to real BPE tokenizers on English text, so token counts are realistic). Equal
  text prefixes give equal token prefixes, which is all prefix routing needs. :data:`SIM_TOKENIZER` is the
  instance everything uses when a model names no tokenizer.

:func:`load_tokenizer` turns a ``ModelSpec.tokenizer`` value (``file://PATH`` or ``PATH`` of a
``tokenizer.json`` or of a folder holding one) into a :class:`Tokenizer`, with errors that name the path.
Nothing here downloads anything.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "SIM_TOKENIZER",
    "ByteTokenizer",
    "ChatTemplateError",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerLoadError",
    "load_tokenizer",
    "load_tokenizer_cached",
    "max_token_bytes",
]

Message = Mapping[str, Any]


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids for one model, plus its chat template."""

    @property
    def name(self) -> str:
        """Where it came from (a path, or ``sim-bytes/N``), for logs and errors."""
        ...

    @property
    def vocab_size(self) -> int:
        """Valid ids are ``0 <= id < vocab_size``."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (``add_special_tokens``: the BOS/EOS a plain prompt gets; a rendered
        chat template already holds its own, so chat prompts are encoded without)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[Message]) -> str | None:
        """The prompt text of a chat (with the generation prompt), or ``None`` when there is no template."""
        ...


class TokenizerLoadError(ValueError):
    """A tokenizer file or folder is missing or unreadable; the message names the path."""


class ChatTemplateError(ValueError):
    """The chat template refused the messages (e.g. its ``raise_exception``) or failed to render."""


# ---- the simulator's tokenizer ----------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes, ``bytes_per_token`` per id (little-endian; the tail is zero-padded). No chat template."""

    def __init__(self, bytes_per_token: int = 4) -> None:
        if bytes_per_token not in (1, 2, 4):
            raise ValueError(f"bytes_per_token must be 1, 2 or 4 (got {bytes_per_token})")
        self.bytes_per_token = bytes_per_token
        self._dtype: np.dtype[Any] = np.dtype({1: "u1", 2: "<u2", 4: "<u4"}[bytes_per_token])

    @property
    def name(self) -> str:
        return f"sim-bytes/{self.bytes_per_token}"

    @property
    def vocab_size(self) -> int:
        return 1 << (8 * self.bytes_per_token)

    @property
    def max_token_bytes(self) -> int:
        return self.bytes_per_token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        raw = text.encode("utf-8")
        pad = (-len(raw)) % self.bytes_per_token
        if pad:
            raw += b"\x00" * pad
        return np.frombuffer(raw, dtype=self._dtype).astype(np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        vocab = self.vocab_size
        arr = np.fromiter((int(t) for t in ids if 0 <= int(t) < vocab), dtype=np.uint64)
        raw = arr.astype(self._dtype).tobytes()
        return raw.rstrip(b"\x00").decode("utf-8", "replace")

    def apply_chat_template(self, messages: Sequence[Message]) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"ByteTokenizer({self.bytes_per_token})"


SIM_TOKENIZER = ByteTokenizer(4)


# ---- Hugging Face fast tokenizers -------------------------------------------------------------------


def _token_text(v: Any) -> str | None:
    """``bos_token`` in a tokenizer_config.json: a string, or an AddedToken dict with ``content``."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return str(v["content"])
    return None


def _compile_template(source: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)  # fmt: skip

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


_GIL_FREE_CHARS = 4096


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the chat template and special tokens of its tokenizer_config.json."""

    def __init__(
        self,
        tok: Any,
        *,
        name: str = "tokenizer.json",
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._tok = tok
        self._name = name
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._special = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template: Any = None
        self._template_lock = threading.Lock()
        self._vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        vocab = tok.get_vocab(with_added_tokens=True)
        # An upper bound (byte-level BPE maps a byte to up to 2 UTF-8 bytes) on the bytes one token covers.
        self._max_token_bytes = max(4, max((len(t.encode("utf-8")) for t in vocab), default=4))
        if vocab:
            self._vocab_size = max(self._vocab_size, max(vocab.values()) + 1)

    @classmethod
    def from_file(cls, path: str | Path, config: Mapping[str, Any] | None = None,
                  chat_template: str | None = None) -> HFTokenizer:  # fmt: skip
        from tokenizers import Tokenizer as _Tok

        p = Path(path)
        try:
            tok = _Tok.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception for bad JSON / unknown models
            _read_json(p)  # names a file that is not JSON at all
            raise TokenizerLoadError(f"{p}: not a readable Hugging Face tokenizer.json ({e})") from None
        cfg = dict(config or {})
        tmpl = chat_template if chat_template is not None else cfg.get("chat_template")
        if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default") or next(iter(named.values()), None)
        if tmpl is not None and not isinstance(tmpl, str):
            raise TokenizerLoadError(f"{p}: 'chat_template' must be a string (got {type(tmpl).__name__})")
        special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(
            tok,
            name=str(p),
            chat_template=tmpl or None,
            bos_token=special["bos_token"],
            eos_token=special["eos_token"],
            special_tokens={k: v for k, v in special.items() if v is not None},
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_token_bytes(self) -> int:
        return self._max_token_bytes

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:  # encode_batch releases the GIL (encode holds it throughout)
            return list(self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        vocab = self._vocab_size
        return str(self._tok.decode([int(t) for t in ids if 0 <= int(t) < vocab], skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[Message]) -> str | None:
        if not self.chat_template:
            return None
        from jinja2.exceptions import TemplateError

        with self._template_lock:
            if self._template is None:
                try:
                    self._template = _compile_template(self.chat_template)
                except TemplateError as e:
                    raise ChatTemplateError(f"chat template of {self._name} does not compile: {e}") from None
        try:
            return str(
                self._template.render(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=True,
                    **self._special,
                )
            )
        except TemplateError as e:
            raise ChatTemplateError(f"chat template refused the messages: {e}") from None

    def __repr__(self) -> str:
        return f"HFTokenizer({self._name!r})"


def max_token_bytes(tok: Tokenizer) -> int:
    """An upper bound on the UTF-8 bytes one token of ``tok`` stands for (32 when it cannot tell)."""
    return int(getattr(tok, "max_token_bytes", 32) or 32)


# ---- loading ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenizerLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise TokenizerLoadError(f"{path}: not valid JSON ({e})") from None


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise TokenizerLoadError(
            f"{uri}: unsupported tokenizer location scheme '{scheme}://' (use file://PATH or a local PATH "
            f"of a tokenizer.json or of a folder holding one; nothing is downloaded)"
        )
    return Path(uri)


def load_tokenizer(uri: str | None) -> Tokenizer:
    """``file://PATH`` or ``PATH`` (a tokenizer.json, or a folder with tokenizer.json and optionally
    tokenizer_config.json / chat_template.jinja) -> :class:`HFTokenizer`; ``None``, ``""`` or ``"sim"``
    -> :data:`SIM_TOKENIZER`. Raises :class:`TokenizerLoadError` naming the path."""
    if uri is None or uri.strip() in ("", "sim"):
        return SIM_TOKENIZER
    path = _local_path(uri.strip()).expanduser()
    config: dict[str, Any] = {}
    template: str | None = None
    if path.is_dir():
        folder, file = path, path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerLoadError(f"{path}: folder has no tokenizer.json")
    elif path.is_file():
        folder, file = path.parent, path
    else:
        raise TokenizerLoadError(f"{path}: no such tokenizer file or folder")
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        data = _read_json(cfg_file)
        if not isinstance(data, dict):
            raise TokenizerLoadError(f"{cfg_file}: expected a JSON object")
        config = data
    jinja_file = folder / "chat_template.jinja"
    if not config.get("chat_template") and jinja_file.is_file():
        try:
            template = jinja_file.read_text(encoding="utf-8")
        except OSError as e:
            raise TokenizerLoadError(f"{jinja_file}: cannot read ({e.strerror or e})") from None
    return HFTokenizer.from_file(file, config, template)


_cache: dict[str, Tokenizer] = {}
_cache_lock = threading.Lock()


def load_tokenizer_cached(uri: str | None) -> Tokenizer:
    """:func:`load_tokenizer`, loaded once per location per process (errors are not cached)."""
    key = (uri or "").strip()
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    tok = load_tokenizer(key or None)
    with _cache_lock:
        return _cache.setdefault(key, tok)
