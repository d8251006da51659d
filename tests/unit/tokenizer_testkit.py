"""A real Hugging Face tokenizer made on the spot (a tiny byte-level BPE trained on a few sentences; never
downloaded), saved as tokenizer.json with a tokenizer_config.json holding a chat template."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM = "You are a helpful assistant for the Corral project. Answer briefly and cite the manual."

SENTENCES = [
    SYSTEM,
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "Where is the corral? The corral is behind the barn, next to the river.",
    "Prefix caching reuses the key value blocks of a shared system prompt.",
    "hello world, hello router, hello engine",
]

# Like Hugging Face chat templates: bos once, one block per message, the generation prompt at the end.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIALS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def make_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE, vocab_size: int = 400) -> Path:
    """Train and save ``folder/tokenizer.json`` (+ ``tokenizer_config.json``); returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg: dict[str, object] = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder
