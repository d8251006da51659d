"""The one tokenizer interface: a real (tiny, trained here) Hugging Face tokenizer, its chat template and
loading errors, and the simulator's byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corral.router.hashing import block_hashes
from corral.router.tokenizer import (
    SIM_TOKENIZER,
    ByteTokenizer,
    ChatTemplateError,
    HFTokenizer,
    Tokenizer,
    TokenizerLoadError,
    load_tokenizer,
    load_tokenizer_cached,
)
from tokenizer_testkit import SYSTEM, make_tokenizer


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    return make_tokenizer(tmp_path / "tok")


def test_loads_file_uri_path_and_folder(tok_dir: Path) -> None:
    a = load_tokenizer(str(tok_dir))
    b = load_tokenizer(str(tok_dir / "tokenizer.json"))
    c = load_tokenizer((tok_dir / "tokenizer.json").as_uri())
    assert isinstance(a, HFTokenizer) and isinstance(a, Tokenizer)
    text = "Where is the corral? hello world"
    ids = a.encode(text)
    assert ids == b.encode(text) == c.encode(text)
    assert len(ids) < len(text.encode())  # real merges, not bytes
    assert ids[0] == 0  # the post-processor's <s> for a plain prompt
    assert a.encode(text, add_special_tokens=False) == ids[1:]
    assert a.decode(ids) == text
    assert a.vocab_size == 400 and all(0 <= t < a.vocab_size for t in ids)
    assert a.name.endswith("tokenizer.json")
    assert load_tokenizer_cached(str(tok_dir)) is load_tokenizer_cached(str(tok_dir))


def test_chat_template_is_rendered_like_hugging_face(tok_dir: Path) -> None:
    tok = load_tokenizer(str(tok_dir))
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs)
    assert text == f"<s><|system|>{SYSTEM}</s><|user|>hi</s><|assistant|>"  # bos/eos from the config
    ids = tok.encode(text or "", add_special_tokens=False)
    assert ids[:2] == [0, 2] and ids.count(0) == 1  # <s> once: the template holds it
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_runs_sandboxed(tmp_path: Path) -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tok = load_tokenizer(str(make_tokenizer(tmp_path / "evil", chat_template=evil)))
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template_means_none(tmp_path: Path) -> None:
    tok = load_tokenizer(str(make_tokenizer(tmp_path / "plain", chat_template=None)))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) is None
    assert SIM_TOKENIZER.apply_chat_template([{"role": "user", "content": "x"}]) is None


def test_chat_template_jinja_file_and_named_templates(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path / "jinja", chat_template=None)
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert load_tokenizer(str(d)).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    d2 = make_tokenizer(tmp_path / "named", chat_template=None)
    cfg = json.loads((d2 / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d2 / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(str(d2)).apply_chat_template([]) == "D"


def test_shared_system_prompt_shares_leading_block_hashes(tok_dir: Path) -> None:
    tok = load_tokenizer(str(tok_dir))
    a, b = (
        tok.encode(tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": q}]) or "", add_special_tokens=False)
        for q in ("Where is the corral?", "hello world, hello engine")
    )  # fmt: skip
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    bs = 4
    ha, hb = block_hashes(a, bs), block_hashes(b, bs)
    assert common // bs >= 3  # the system prompt spans several blocks
    assert ha[: common // bs] == hb[: common // bs]
    assert ha[common // bs + 1 :] != hb[common // bs + 1 :]


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: p / "missing.json", "no such tokenizer file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "folder has no tokenizer.json"),
        (lambda p: (p / "bad.json").write_text("{nope") and p / "bad.json", "not valid JSON"),
        (lambda p: (p / "odd.json").write_text('{"model": 3}') and p / "odd.json", "not a readable"),
    ],
)
def test_load_errors_name_the_path(tmp_path: Path, setup: object, match: str) -> None:
    path = setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(TokenizerLoadError, match=match) as ei:
        load_tokenizer(str(path))
    assert str(path) in str(ei.value)


def test_bad_config_and_schemes(tok_dir: Path) -> None:
    (tok_dir / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(str(tok_dir))
    with pytest.raises(TokenizerLoadError, match="unsupported tokenizer location scheme 'https://'"):
        load_tokenizer("https://huggingface.co/x/tokenizer.json")


def test_sim_tokenizer_is_the_byte_tokenizer() -> None:
    assert load_tokenizer(None) is SIM_TOKENIZER and load_tokenizer("") is SIM_TOKENIZER
    assert isinstance(SIM_TOKENIZER, ByteTokenizer) and isinstance(SIM_TOKENIZER, Tokenizer)
    text = "héllo, corral"
    ids = SIM_TOKENIZER.encode(text)
    assert len(ids) == -(-len(text.encode()) // 4) and SIM_TOKENIZER.decode(ids) == text
    assert SIM_TOKENIZER.vocab_size == 1 << 32
    one = ByteTokenizer(1)
    assert one.encode("ab") == [97, 98] and one.decode([97, 98, 300]) == "ab" and one.vocab_size == 256
