"""Haystack prose: consecutive sentences of a book, counted in tokens of the model's tokenizer.

Shipped books (`kcache/eval/data/*.txt`, public domain, Project Gutenberg body texts, one paragraph per line):
`alice` (#11, Alice's Adventures in Wonderland), `peter_pan` (#16, Peter Pan), `sherlock` (#1661, The Adventures
of Sherlock Holmes, first 300 KB). Licence headers, chapter headings, scene-break rows, `_emphasis_` marks and
Peter Pan's bracketed editorial glosses were removed and hard-wrapped lines joined.

Varied prose matters: a model attends trivially to a needle hidden in one repeated filler sentence.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

BOOKS = ("alice", "peter_pan", "sherlock")

# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by a space and a capital or an opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])(['\")]*)\s+(?=['\"(]?[A-Z])")
_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Dr|St|Mme|Messrs)\.$")


def read_text(source: str | Path) -> str:
    """A shipped book by name (see BOOKS), else the text of a file."""
    if source in BOOKS:
        return (importlib.resources.files("kcache.eval") / "data" / f"{source}.txt").read_text(encoding="utf-8")
    return Path(source).read_text(encoding="utf-8")


def split_sentences(text: str) -> list[str]:
    """Sentences in order, whitespace collapsed; an abbreviation such as "Mr." does not end one."""
    flat = " ".join(text.split())
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(flat):
        parts.append(flat[start:m.start()] + m.group(1))
        start = m.end()
    parts.append(flat[start:])
    sentences: list[str] = []
    for p in parts:
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += " " + p
        else:
            sentences.append(p)
    return [s for s in sentences if s]


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the model sees for `text` as a whole prompt (special tokens such as BOS included)."""
    return len(tokenizer(text)["input_ids"])


@dataclass(frozen=True)
class Corpus:
    """A text's sentences with their token counts when joined by single spaces."""

    name: str
    sentences: tuple[str, ...]
    n_tokens: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        return sum(self.n_tokens)

    def take(self, tokenizer, start: int, budget: int) -> tuple[list[str], list[int], str]:
        """Consecutive sentences from `start` (wrapping to the beginning) filling at most `budget` tokens, their
        token counts, and the leading words of the next one that still fit (a tail, maybe empty), so the
        filler lands within a word of the budget as in token-truncated haystacks.
        """
        if budget > self.total_tokens:
            raise ValueError(f"haystack {self.name!r} has {self.total_tokens} tokens, {budget} are needed")
        out, sizes, used, i = [], [], 0, start
        while used + self.n_tokens[i] <= budget:
            out.append(self.sentences[i])
            sizes.append(self.n_tokens[i])
            used += self.n_tokens[i]
            i = (i + 1) % len(self.sentences)
        return out, sizes, _cut_words(tokenizer, self.sentences[i], budget - used)


def _cut_words(tokenizer, sentence: str, budget: int) -> str:
    """The longest run of leading words of `sentence` that fits in `budget` tokens (counted with a leading space)."""
    words = sentence.split(" ")
    lo, hi = 0, len(words)  # binary search: fits(lo) holds, fits(hi) does not (the whole sentence did not fit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if piece_tokens(tokenizer, [" ".join(words[:mid])])[0] <= budget:
            lo = mid
        else:
            hi = mid
    return " ".join(words[:lo])


def piece_tokens(tokenizer, sentences: list[str]) -> list[int]:
    """Tokens of each sentence inside a haystack: with its leading space, without special tokens.

    Byte-level BPE does not merge across the space before a word, so these counts add up to the joined
    text's count (give or take a token at odd joins; the task builder checks the whole prompt).
    """
    ids = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


def load_corpus(source: str | Path, tokenizer) -> Corpus:
    """Sentences and token counts of a shipped book or a text file, cached per (source, tokenizer)."""
    if source in BOOKS:
        return _load_corpus(source, None, tokenizer)
    stat = Path(source).stat()  # a file rewritten in place is a new corpus
    return _load_corpus(str(source), (stat.st_mtime_ns, stat.st_size), tokenizer)


@functools.lru_cache(maxsize=16)
def _load_corpus(source: str, _version, tokenizer) -> Corpus:
    sentences = split_sentences(read_text(source))
    if not sentences:
        raise ValueError(f"haystack {source!r} holds no text")
    return Corpus(str(source), tuple(sentences), tuple(piece_tokens(tokenizer, sentences)))
