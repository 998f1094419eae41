"""Do two questions that embed alike ask the same thing? The answer cache's guard against false hits.

A sentence embedding scores a question and its negation, or the same question about another
number or name, 0.83-0.99 cosine (GPTCache's issues; scripts/measure_cache_threshold.py measures
ours), so similarity alone serves wrong answers. ``disagreement`` compares what embeddings blur:
the numbers, the negations and the names of the two questions, and (given the embedding) their
topic words. It errs towards "they differ": a refused paraphrase costs one live answer, a false
hit serves a wrong one. Known misses on the safe side: "twenty five" vs "25", a question typed
with and without a proper noun ("How far is Paris?" vs "How far is it?").
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher
from typing import Callable, Sequence

import numpy as np

TOKEN = re.compile(r"\w+(?:['’.,]\w+)*")  # keeps "3.5", "1,000", "don't", "GPT4" whole
NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*")  # "1800s" -> 1800, "5th" -> 5; not the 4 of "GPT4"
NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "hundred": 100,
    "thousand": 1000, "million": 10**6, "billion": 10**9,
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10,
}
NEGATIONS = {"not", "no", "never", "without", "none", "nobody", "nothing", "neither", "nor", "cannot"}
# Contractions as people type them without the apostrophe ("dont", "isnt").
BARE_NT = {"dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "wont", "wouldnt", "shouldnt",
           "couldnt", "hasnt", "havent", "hadnt", "aint", "mustnt", "neednt"}
# Words a question is built from whatever it asks about: articles, pronouns, auxiliaries,
# question words and the light prepositions. A paraphrase swaps these freely ("How do I... in
# CSS" / "How can I... with CSS"); the topic check compares the other words. Prepositions that
# carry meaning stay: "before"/"after" a run differ.
SCAFFOLD = set("""
a an the this that these those some any every each all my your our their his her its me you we they he she
it i us them is am are was were be been being do does did have has had will would shall should can could
may might must what what's whats which who whom whose when where why how how's where's who's there here
please of in on at to for with by from into about per as
""".split())
# A topic swap: the same template with one slot of at most SWAP_WORDS words replaced, and the
# new words not synonyms of the old (single-word MiniLM cosine below SYNONYM). Measured here:
# synonyms tire/tyre 0.83, film/movie 0.84, car/automobile 0.86, fridge/refrigerator 0.96;
# swapped topics 0.30-0.71 (gold/silver 0.67, spain/portugal 0.71, monday/friday 0.71,
# tv/money 0.45). Looser synonyms score like swapped topics (sorry/apologise 0.47,
# lower/reduce 0.50), so only a near-identical template is judged, never a reworded question.
SWAP_WORDS = 2
SYNONYM = 0.8

Embed = Callable[[Sequence[str]], Sequence[np.ndarray]]


def _tokens(text: str) -> list[str]:
    return [re.sub(r"['’]s$", "", t) for t in TOKEN.findall(text)]  # "Tokyo's" -> "Tokyo"


def numbers(text: str) -> set[str]:
    """The numbers a question names, as text ("3" for "3", "3.0" and "three"): digits (decimals,
    thousands separators) and number words."""
    found = set()
    for digits in NUMBER.findall(text):
        grouped = re.fullmatch(r"\d{1,3}(,\d{3})+", digits)
        try:
            found.add(f"{float(digits.replace(',', '' if grouped else '.')):.12g}")
        except ValueError:  # "1.2.3": a version, compared as written
            found.add(digits)
    found.update(str(NUMBER_WORDS[t.lower()]) for t in _tokens(text) if t.lower() in NUMBER_WORDS)
    return found


def negations(text: str) -> int:
    """How many negating words a question has."""
    words = [t.lower().replace("’", "'") for t in TOKEN.findall(text)]
    return sum(w in NEGATIONS or w in BARE_NT or w.endswith("n't") for w in words)


def names(text: str) -> dict[str, str]:
    """The named entities of a question, lower-cased -> as written: capitalised words that do not
    start a sentence, ALL-CAPS acronyms, and words with inner capitals or digits ("iPhone", "GPT4")."""
    found: dict[str, str] = {}
    initial = True  # the next word starts a sentence
    for match in re.finditer(r"[.!?:;\n]|" + TOKEN.pattern, text):
        word = re.sub(r"['’]s$", "", match.group())
        if word in ".!?:;\n":
            initial = True
            continue
        letters = [c for c in word if c.isalpha()]
        acronym = len(letters) >= 2 and all(c.isupper() for c in letters)
        inner = any(c.isupper() for c in word[1:]) or bool(re.fullmatch(r"[^\W\d_]+\d\w*", word))
        capital = word[:1].isupper() and not initial and word not in ("I", "I'm", "I've", "I'd", "I'll")
        if acronym or inner or capital:
            found.setdefault(word.lower(), word)
        initial = False
    return found


def _words(text: str) -> set[str]:
    return {t.lower() for t in _tokens(text)}


def _stem(word: str) -> str:
    """Plural folding, enough to see "egg" in "eggs" and "fridge" in "fridges"."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


def _topic_words(text: str) -> list[str]:
    """A question's words in order, without scaffolding, numbers and negations (their own checks)."""
    out = []
    for t in _tokens(text):
        w = t.lower().replace("’", "'")
        if w in SCAFFOLD or w in NEGATIONS or w in BARE_NT or w.endswith("n't") or w in NUMBER_WORDS or any(c.isdigit() for c in w):
            continue
        out.append(w)
    return out


def topic_swap(a: str, b: str, embed: Embed) -> tuple[list[str], list[str]] | None:
    """The words swapped between two questions of one template ("function of a TV" / "function of
    money"): (a's, b's); None when they are not such a swap (worded differently, or one only adds
    words) or the swapped words are synonyms."""
    wa, wb = _topic_words(a), _topic_words(b)
    blocks = [op for op in SequenceMatcher(None, [_stem(w) for w in wa], [_stem(w) for w in wb], autojunk=False).get_opcodes()
              if op[0] != "equal"]
    if len(blocks) != 1 or blocks[0][0] != "replace":
        return None
    _, i1, i2, j1, j2 = blocks[0]
    only_a, only_b = wa[i1:i2], wb[j1:j2]
    if len(only_a) > SWAP_WORDS or len(only_b) > SWAP_WORDS or len(wa) == len(only_a):
        return None  # a whole question replaced is a rewording, not a slot of one template
    sims = _vectors(tuple(only_a), embed) @ _vectors(tuple(only_b), embed).T  # unit vectors: cosine
    if (sims.max(axis=1) >= SYNONYM).all() and (sims.max(axis=0) >= SYNONYM).all():
        return None
    return only_a, only_b


def _vectors(words: tuple[str, ...], embed: Embed) -> np.ndarray:
    return np.stack([_word_vector(w, embed) for w in words])


_word_cache: dict[tuple[int, str], np.ndarray] = {}


def _word_vector(word: str, embed: Embed) -> np.ndarray:
    """One word's embedding, kept: the same topic words come back with every lookup."""
    key = (id(embed), word)
    if key not in _word_cache:
        if len(_word_cache) > 20_000:
            _word_cache.clear()
        _word_cache[key] = np.asarray(embed([word])[0], dtype=np.float32)
    return _word_cache[key]


def disagreement(a: str, b: str, embed: Embed | None = None) -> str | None:
    """None when two questions agree on numbers, negations and names (and, given ``embed``, on
    their topic words); else why they differ, in a few words."""
    na, nb = numbers(a), numbers(b)
    if na != nb:
        return f"numbers differ: {_show(na - nb)} vs {_show(nb - na)}"
    ca, cb = negations(a), negations(b)
    if (ca > 0) != (cb > 0):
        return "one is negated"
    if ca % 2 != cb % 2:
        return "negations differ"
    ea, eb = names(a), names(b)
    wa, wb = _words(a), _words(b)
    missing_a = [w for k, w in ea.items() if k not in wb]
    missing_b = [w for k, w in eb.items() if k not in wa]
    if missing_a or missing_b:
        return f"names differ: {', '.join(missing_a) or 'none'} vs {', '.join(missing_b) or 'none'}"
    if embed is not None:
        swap = topic_swap(a, b, embed)
        if swap:
            return f"topics differ: {', '.join(swap[0])} vs {', '.join(swap[1])}"
    return None


def _show(values: set[str]) -> str:
    return ", ".join(sorted(values)) or "none"
