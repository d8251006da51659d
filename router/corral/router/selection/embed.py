"""The CPU text embedding behind the ``embedding`` signal: hashed character n-grams with TF-IDF weights.

No model download and no GPU. A text is lower-cased, every run of non-word characters becomes one space,
and its character 3-, 4- and 5-grams (across word boundaries, so short words and word pairs count too) are
hashed into :data:`DIM` buckets with a polynomial rolling hash computed by numpy over the whole string at
once (C speed: a 20k-character prompt takes well under a millisecond). Counts are sub-linearly scaled
(1 + log tf), weighted by the inverse document frequency fitted on the policy's labelled examples, and
L2-normalised; similarity is the dot product (cosine). This is the "TF-IDF fallback" of issue 15; its
accuracy on labelled prompts and its cost are measured by ``corral bench select``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

DIM = 1 << 14
"""Hash buckets (a power of two)."""
MAX_CHARS = 20_000
"""Only the first this many characters of a prompt are embedded."""
NGRAMS = (3, 4, 5)
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)
_PRIME = np.uint64(1099511628211)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(64 - 14)


def counts(text: str) -> np.ndarray:
    """Bucket counts (float32, :data:`DIM`) of ``text``'s character n-grams."""
    norm = " " + _NON_WORD.sub(" ", text[:MAX_CHARS].lower()).strip() + " "
    codes = np.frombuffer(norm.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    out = np.zeros(DIM, dtype=np.float32)
    if len(codes) <= 2:
        return out
    with np.errstate(over="ignore"):
        for n in NGRAMS:
            m = len(codes) - n + 1
            if m <= 0:
                continue
            h = np.full(m, np.uint64(n), dtype=np.uint64)
            for j in range(n):
                h = h * _PRIME + codes[j : j + m]
            idx = ((h * _MIX) >> _SHIFT).astype(np.int64)  # the top bits of a multiplicative hash
            out += np.bincount(idx, minlength=DIM).astype(np.float32)
    return out


class Embedder:
    """Vectors over one vocabulary: IDF fitted on a corpus (all labelled examples of a policy)."""

    def __init__(self, corpus: Sequence[str]) -> None:
        df = np.zeros(DIM, dtype=np.float32)
        for text in corpus:
            df += counts(text) > 0
        n = max(1, len(corpus))
        self.idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)

    def embed(self, text: str) -> np.ndarray:
        """``text`` as an L2-normalised vector of :data:`DIM` floats (all zero for a text without words)."""
        c = counts(text)
        nz = c > 0
        v = np.zeros(DIM, dtype=np.float32)
        v[nz] = (1.0 + np.log(c[nz])) * self.idf[nz]
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.embed(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)
