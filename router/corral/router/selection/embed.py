"""The CPU text embedding behind the ``embedding`` signal: hashed character n-grams with TF-IDF weights.

No model download and no GPU: a text is lower-cased, split into words, and each word's character 3- to
5-grams (with word boundaries) plus the word itself are hashed (xxhash) into :data:`DIM` buckets; the
counts are sub-linearly scaled (1 + log tf), weighted by the inverse document frequency learned from the
signal's labelled examples, and L2-normalised. Similarity is the dot product (cosine). This is the
"TF-IDF fallback" of issue 15; its accuracy and cost are measured by ``corral bench select``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import xxhash

DIM = 1 << 14
"""Hash buckets (a power of two)."""
_WORD = re.compile(r"\w+", re.UNICODE)


def features(text: str) -> dict[int, float]:
    """Bucket -> sub-linear term frequency of ``text``'s words and character n-grams."""
    counts: dict[int, int] = {}
    h = xxhash.xxh32_intdigest
    mask = DIM - 1
    for w in _WORD.findall(text.lower()[:20_000]):
        grams = [w]
        padded = f"<{w}>"
        n_chars = len(padded)
        for n in (3, 4, 5):
            grams.extend(padded[i : i + n] for i in range(n_chars - n + 1))
        for g in grams:
            k = h(g.encode()) & mask
            counts[k] = counts.get(k, 0) + 1
    return {k: 1.0 + float(np.log(c)) for k, c in counts.items()}


class Embedder:
    """Vectors over one vocabulary: IDF fitted on a corpus (all labelled examples of a policy)."""

    def __init__(self, corpus: Sequence[str]) -> None:
        df = np.zeros(DIM, dtype=np.float32)
        for text in corpus:
            for k in features(text):
                df[k] += 1.0
        n = max(1, len(corpus))
        self.idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)

    def embed(self, text: str) -> np.ndarray:
        """``text`` as an L2-normalised vector of :data:`DIM` floats (all zero for a text without words)."""
        v = np.zeros(DIM, dtype=np.float32)
        f = features(text)
        if f:
            idx = np.fromiter(f.keys(), dtype=np.int64, count=len(f))
            v[idx] = np.fromiter(f.values(), dtype=np.float32, count=len(f)) * self.idf[idx]
            norm = float(np.linalg.norm(v))
            if norm > 0:
                v /= norm
        return v

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.embed(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)
