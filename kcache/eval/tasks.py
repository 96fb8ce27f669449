"""Long-context retrieval tasks, generated locally and deterministic by seed.

Every prompt is a raw completion (no chat template: SmolLM2 retrieves passkeys this way and not through its
chat template): an intro line, a haystack of consecutive book sentences with the needles inserted at sentence
boundaries, then a question that ends in the answer's prefix ("... The pass key is"). Lengths and depths are
measured in tokens of the given tokenizer: the prompt has at most `length` tokens and falls short by at most
a word, and a needle at depth d sits at the sentence boundary nearest to d of the way through the book text
(0: right after the intro, 1: after the last whole sentence; other needles do not count).
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from kcache.eval.haystack import BOOKS, count_tokens, load_corpus, piece_tokens

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")

# Keys and values that the shipped books never use, so only a needle can supply them.
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Tbilisi", "Kyoto", "Havana", "Dakar", "Perth",
          "Riga", "Tunis", "Bogota", "Manila", "Zagreb", "Accra", "Helsinki", "Montevideo", "Kathmandu")
WORDS = ("orchid", "saffron", "granite", "cobalt", "juniper", "falcon", "tangerine", "walnut", "pebble", "cactus",
         "harpoon", "quartz", "biscuit", "dolphin", "magnolia", "lavender", "turquoise", "pretzel", "peacock", "banjo")


@dataclass
class Item:
    """One prompt and its expected answer; `length` and `depth` are the requested grid cell."""

    task: str
    length: int
    depth: float
    prompt: str
    answer: str
    max_new_tokens: int = 8  # a 5-digit number is 6 tokens with digit-split tokenizers
    meta: dict = field(default_factory=dict)


def _numbers(rng: random.Random, k: int) -> list[str]:
    """k distinct 5-digit numbers."""
    return [str(x) for x in rng.sample(range(10000, 100000), k)]


def _assemble(tokenizer, rng: random.Random, source, length: int, needles: list[tuple[float, str]],
              question: str) -> tuple[str, dict]:
    """Prompt of at most `length` tokens with each (depth, sentence) needle placed; returns (prompt, meta)."""
    corpus = load_corpus(source, tokenizer)
    start = rng.randrange(len(corpus.sentences))
    question_tokens = len(tokenizer("\n" + question, add_special_tokens=False)["input_ids"])
    needle_tokens = sum(piece_tokens(tokenizer, [s for _, s in needles]))
    budget = length - count_tokens(tokenizer, INTRO + "\n") - question_tokens - needle_tokens
    # Per-piece counts can be off by a token or two at the joins: measure the whole prompt and shrink until it fits.
    while True:
        if budget < 0:
            raise ValueError(f"length {length} is too short for the intro, question and needles")
        filler, sizes, tail = corpus.take(tokenizer, start, budget)
        prompt = _join(tokenizer, filler, sizes, tail, needles, question)
        n = count_tokens(tokenizer, prompt)
        if n <= length:
            break
        budget -= n - length
    return prompt, {"source": corpus.name, "start_sentence": start, "n_tokens": n}


def _join(tokenizer, filler: list[str], sizes: list[int], tail: str, needles: list[tuple[float, str]],
          question: str) -> str:
    """Intro, filler with needles at the sentence boundaries nearest to their depths, the tail, question.

    A needle at depth d follows the boundary nearest to d of the filler's tokens (the tail included). Needles
    never follow the tail (a cut sentence), so depth 1 puts a needle before it, at most a sentence from the end.
    """
    bounds = list(itertools.accumulate(sizes, initial=0))  # filler tokens before each boundary
    total = bounds[-1] + (piece_tokens(tokenizer, [tail])[0] if tail else 0)
    pieces = list(filler)
    # Right to left (deepest first), so the boundary indices of the needles still to place stay valid.
    for depth, sentence in sorted(needles, key=lambda n: n[0], reverse=True):
        cut = min(range(len(bounds)), key=lambda i: abs(bounds[i] - depth * total))
        pieces.insert(cut, sentence)
    if tail:
        pieces.append(tail)
    return INTRO + "\n" + " ".join(pieces) + "\n" + question


def _source(rng: random.Random, haystack_file: str | Path | None):
    return str(haystack_file) if haystack_file is not None else rng.choice(BOOKS)


def passkey(tokenizer, length: int, depth: float, seed: int | str = 0, haystack_file=None) -> Item:
    """A 5-digit pass key stated twice in one needle, as in the passkey test of Mohtashami and Jaggi (2023)."""
    rng = random.Random(seed)
    key, = _numbers(rng, 1)
    text = f"The pass key is {key}. Remember it. {key} is the pass key."
    prompt, meta = _assemble(tokenizer, rng, _source(rng, haystack_file), length, [(depth, text)],
                             "What is the pass key? The pass key is")
    return Item("passkey", length, depth, prompt, key, meta=meta | {"needles": [text]})


def needle(tokenizer, length: int, depth: float, seed: int | str = 0, haystack_file=None) -> Item:
    """A non-numeric fact: the magic word for a city."""
    rng = random.Random(seed)
    city, word = rng.choice(CITIES), rng.choice(WORDS)
    text = f"The special magic word for {city} is {word}."
    prompt, meta = _assemble(tokenizer, rng, _source(rng, haystack_file), length, [(depth, text)],
                             f"What is the special magic word for {city}? The special magic word for {city} is")
    return Item("needle", length, depth, prompt, word, meta=meta | {"needles": [text]})


def multikey(tokenizer, length: int, depth: float, seed: int | str = 0, haystack_file=None, keys: int = 4) -> Item:
    """`keys` magic numbers for different cities; the one asked for sits at `depth`, the others anywhere."""
    rng = random.Random(seed)
    cities = rng.sample(CITIES, keys)
    values = _numbers(rng, keys)
    texts = [f"The special magic number for {c} is {v}." for c, v in zip(cities, values)]
    depths = [depth] + [rng.random() for _ in cities[1:]]
    prompt, meta = _assemble(tokenizer, rng, _source(rng, haystack_file), length, list(zip(depths, texts)),
                             f"What is the special magic number for {cities[0]}? "
                             f"The special magic number for {cities[0]} is")
    return Item("multikey", length, depth, prompt, values[0], meta=meta | {"needles": texts})


def multihop(tokenizer, length: int, depth: float, seed: int | str = 0, haystack_file=None,
             hops: int = 2, chains: int = 2) -> Item:
    """Chained needles: city A's number is city B's, ..., the last city's number is given.

    The question names the first city of chain 0, so the answer takes `hops` lookups; the other chains are
    distractors with their own numbers (with one chain, copying the only number would score). The needle
    holding chain 0's number sits at `depth`, the links anywhere.
    """
    rng = random.Random(seed)
    cities = rng.sample(CITIES, hops * chains)
    values = _numbers(rng, chains)
    needles = []
    for c, value in enumerate(values):
        chain = cities[c * hops:(c + 1) * hops]
        links = [f"The special magic number for {a} is the same as the special magic number for {b}."
                 for a, b in zip(chain, chain[1:])]
        needles.append((depth if c == 0 else rng.random(), f"The special magic number for {chain[-1]} is {value}."))
        needles += [(rng.random(), t) for t in links]
    head = cities[0]
    prompt, meta = _assemble(tokenizer, rng, _source(rng, haystack_file), length, needles,
                             f"What is the special magic number for {head}? The special magic number for {head} is")
    return Item("multihop", length, depth, prompt, values[0], meta=meta | {"needles": [t for _, t in needles]})


TASKS = {"passkey": passkey, "needle": needle, "multikey": multikey, "multihop": multihop}


def generate(task: str, tokenizer, lengths, depths, samples: int = 1, seed: int = 0, haystack_file=None,
             **options) -> list[Item]:
    """Items over the grid lengths x depths x samples; each cell's seed depends only on (seed, task, cell), so
    growing the grid leaves the other items unchanged."""
    return [TASKS[task](tokenizer, length, depth, f"{seed}:{task}:{length}:{depth}:{i}", haystack_file, **options)
            for length in lengths for depth in depths for i in range(samples)]


_ARTICLES = {"the", "a", "an"}


def answer_correct(prediction: str, answer: str) -> bool:
    """Whether the first number (numeric answers) or first word other than an article (word answers) of the
    prediction is the answer, case-insensitively: a model that goes on talking after the answer still scores."""
    if answer.isdigit():
        found = re.findall(r"\d+", prediction)
    else:
        found = [w for w in re.findall(r"[A-Za-z]+", prediction) if w.lower() not in _ARTICLES]
    return bool(found) and found[0].lower() == answer.lower()
