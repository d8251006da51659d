"""The OpenAI request shapes the HTTP front accepts (pydantic), and the limits both fronts enforce.

Fields are checked strictly (a number is not a string, a boolean is not a number) and within the ranges
the engines accept; every refusal is a :class:`~.errors.BadRequest` naming the field. Unknown fields are
ignored, as OpenAI-compatible servers do. ``temperature`` omitted means OpenAI's default (1.0), not greedy.
The gRPC front's ``SamplingParams`` go through :func:`check_sampling` (same limits, ``sampling.`` names).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from corral.v1 import engine_pb2 as epb
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import BadRequest
from .limits import MAX_NAME_CHARS

U32 = 1 << 32
MAX_SEED = (1 << 63) - 1
MAX_TOP_K = (1 << 31) - 1
MAX_STOP = 16
MAX_PROMPT_IDS = 1 << 20  # ModelSpec.maxModelLen's bound: checked before looking at each id
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when the field is omitted
F32_MIN_NORMAL = 1.1754943508222875e-38  # SamplingParams' floats are float32


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def bad_request(e: ValidationError) -> BadRequest:
    """The first problem of a pydantic ValidationError, as a BadRequest naming the field."""
    err = e.errors(include_url=False)[0]
    field = _path(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err.get("type") == "missing":
        return BadRequest(f"missing required field '{field}'")
    if not field:
        return BadRequest(f"invalid request body: {msg}")
    return BadRequest(f"invalid field '{field}': {msg}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=False)


class StreamOptions(_Model):
    include_usage: bool = False


class _GenerationRequest(_Model):
    """Fields common to completions and chat completions."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, lt=U32)
    max_completion_tokens: int | None = Field(default=None, ge=1, lt=U32)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)  # -1 / 0: disabled
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[str] | None = None
    ignore_eos: bool = False
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields the engines do not apply: type- and range-checked like OpenAI's API (a hostile value is a
    # 400 naming the field), otherwise not used. ``logprobs`` is an int (completions) or a bool (chat).
    logprobs: int | bool | None = Field(default=None, ge=0, le=20)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | int | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | int | None = Field(default=None, ge=-2.0, le=2.0)
    best_of: int | None = Field(default=None, ge=1, le=20)
    echo: bool | None = None
    logit_bias: dict[str, float | int] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        if v is not None and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            raise ValueError("must be a string or a list of strings")
        if v is not None and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v

    @field_validator("temperature", "top_p", mode="after")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("n", mode="after")
    @classmethod
    def _one(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError(f"only n=1 is supported (got {v}): send one request per completion")
        return v

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> epb.SamplingParams:
        return epb.SamplingParams(
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            # float32 on the wire: a tiny top_p must not round to 0, which engines read as "off" (1.0)
            top_p=1.0 if self.top_p is None else max(self.top_p, F32_MIN_NORMAL),
            top_k=self.top_k or 0,
            seed=self.seed or 0,
            stop=self.stop or [],
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a list of token ids, or a list of one string."""

    prompt: str | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(f"must be a string or a list of token ids (got {type(v).__name__})")
        if not v:
            raise ValueError("must not be empty")
        if len(v) > MAX_PROMPT_IDS:
            raise ValueError(f"{len(v)} token ids: more than any model's length (at most {MAX_PROMPT_IDS})")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            for i, t in enumerate(v):
                if not 0 <= t < U32:
                    raise ValueError(f"token id prompt[{i}] = {t} is out of range (0 <= id < 2^32)")
            return v
        if len(v) == 1 and isinstance(v[0], str):
            return v[0]
        if all(isinstance(p, (str, list)) for p in v):
            raise ValueError("a batch of several prompts is not supported: send one request per prompt")
        raise ValueError("must be a string, a list of token ids, or a list of one string")


ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]
"""The roles of OpenAI's chat API (vLLM accepts the same)."""


class ChatMessage(_Model):
    role: ChatRole
    content: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        """A string, or OpenAI content parts of type ``text`` (joined); anything else is refused."""
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError(f"must be a string or a list of text parts (got {type(v).__name__})")
        texts = []
        for j, part in enumerate(v):
            if not isinstance(part, dict):
                raise ValueError(f"content[{j}] must be a text part object (got {type(part).__name__})")
            kind = part.get("type", "text")
            if kind != "text":
                raise ValueError(f"content[{j}] is of type {kind!r}: only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"content[{j}].text must be a string (got {type(text).__name__})")
            texts.append(text)
        return "".join(texts)

    def as_dict(self) -> dict[str, str]:
        d = {"role": self.role, "content": self.content or ""}
        if self.name is not None:
            d["name"] = self.name
        return d


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise ValueError("must be a non-empty list of {role, content} objects")
        return v


def parse(cls: type[_Model], body: Any) -> Any:
    """Validate a parsed JSON body against one of the request models (BadRequest naming the field)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise bad_request(e) from None


def check_sampling(sp: epb.SamplingParams | None) -> epb.SamplingParams:
    """The gRPC front's sampling parameters within the same limits (unset: OpenAI's defaults)."""
    if sp is None:
        return epb.SamplingParams(temperature=DEFAULT_TEMPERATURE, top_p=1.0)
    if not (math.isfinite(sp.temperature) and 0.0 <= sp.temperature <= 2.0):
        raise BadRequest(f"invalid field 'sampling.temperature': must be in [0, 2] (got {sp.temperature})")
    if not (math.isfinite(sp.top_p) and 0.0 <= sp.top_p <= 1.0):
        raise BadRequest(f"invalid field 'sampling.top_p': must be in (0, 1], 0 = 1.0 (got {sp.top_p})")
    if sp.top_k < -1:
        raise BadRequest(
            f"invalid field 'sampling.top_k': must be -1 (or 0) to disable, or >= 1 (got {sp.top_k})"
        )
    if sp.seed > MAX_SEED:
        raise BadRequest(f"invalid field 'sampling.seed': must be in [0, 2^63 - 1] (got {sp.seed})")
    if len(sp.stop) > MAX_STOP:
        raise BadRequest(f"invalid field 'sampling.stop': at most {MAX_STOP} stop sequences")
    out = epb.SamplingParams()
    out.CopyFrom(sp)
    if out.top_p == 0.0:
        out.top_p = 1.0
    return out
