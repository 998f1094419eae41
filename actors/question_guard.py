"""Do two questions that embed alike ask the same thing? The answer cache's guard against false hits.

A sentence embedding scores a question and its negation, or the same question about another
number, name or topic, as alike as two paraphrases (MiniLM here, scripts/measure_cache_threshold.py
over scripts/cache_pairs.py: paraphrases 0.68-0.99, median 0.94; negations 0.89-0.99; other
numbers 0.74-0.95; opposites 0.66-0.97; the same words reordered 0.97-1.00; another name or the
same template about another thing up to 0.90 and 0.99), so similarity alone serves wrong answers.
``disagreement`` compares what embeddings blur: numbers, negations, names, opposites (before/after)
and word order, and, given the embedding, a topic swapped in the same template ("function of a
TV" / "function of money"). It errs towards "they differ": a refused paraphrase costs one live
answer, a false hit serves a wrong one. Refused though the same: "twenty five" vs "25", a proper
noun left out ("How far is Paris?" vs "How far is it?"), a loose synonym in the same template
("What does HTTP stand for / is HTTP short for"). Not caught: another topic asked in other words
("How do I cook rice?" / "What's the best way to make quinoa?", 0.40-0.69 measured): the
threshold keeps those out.
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
    "ninth": 9, "tenth": 10, "dozen": 12, "half": 0.5, "quarter": 0.25, "twice": 2, "double": 2, "triple": 3,
}
NEGATIONS = {"not", "no", "never", "without", "none", "nobody", "nothing", "neither", "nor", "cannot"}
# Contractions as people type them without the apostrophe ("dont", "isnt").
BARE_NT = {"dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "wont", "wouldnt", "shouldnt",
           "couldnt", "hasnt", "havent", "hadnt", "aint", "mustnt", "neednt"}
# Opposites embed as alike as negations ("eat before a run" / "eat after running": 0.88): a
# question with one side's word and not the other's asks the opposite of one with the other's.
OPPOSITES = [(set(x.split()), set(y.split())) for x, y in (
    ("before", "after"), ("hot warm warmer hotter", "cold cool colder cooler"), ("summer", "winter"),
    ("increase raise boost more", "decrease reduce lower less fewer"), ("buy buying", "sell selling"),
    ("gain", "lose"), ("win", "lose"), ("on", "off"), ("start", "stop"), ("open", "close"),
    ("up", "down"), ("inside indoor indoors", "outside outdoor outdoors"), ("above", "below"),
    ("best", "worst"), ("pros", "cons"), ("advantages", "disadvantages"), ("minimum min", "maximum max"),
    ("early earlier", "late later"), ("day", "night"), ("morning", "evening"), ("young", "old"),
    ("cheap cheapest", "expensive"), ("fast faster fastest quick", "slow slower slowest"),
    ("big bigger biggest large", "small smaller smallest"), ("high higher highest", "low lower lowest"),
    ("add", "remove"), ("import", "export"), ("true", "false"), ("left", "right"), ("north", "south"),
    ("east", "west"), ("men male", "women female"), ("wet", "dry"), ("light", "dark"), ("safe", "dangerous"),
    ("legal", "illegal"), ("healthy", "unhealthy"), ("possible", "impossible"), ("like", "dislike"),
)]
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
# A template is also its frame: the question words and light prepositions, in order ("what ...
# of ..."). A paraphrase usually changes it ("What causes headaches?" / "Why do people get
# headaches?"); a swapped topic keeps it ("What is the price of gold/silver?").
FRAME = set("what which who whom whose when where why how of in on at to for with by from into about per as".split())

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
    found.update(f"{NUMBER_WORDS[t.lower()]:.12g}" for t in _tokens(text) if t.lower() in NUMBER_WORDS)
    return found


def negations(text: str) -> int:
    """How many negating words a question has."""
    words = [t.lower().replace("’", "'") for t in TOKEN.findall(text)]
    return sum(w in NEGATIONS or w in BARE_NT or w.endswith("n't") for w in words)


def names(text: str) -> dict[str, str]:
    """The named entities of a question, lower-cased -> as written: capitalised words that do not
    start a sentence, ALL-CAPS acronyms, and words with inner capitals or digits ("iPhone", "GPT4")."""
    found: dict[str, str] = {}
    if not any(c.islower() for c in text) and len(text.split()) >= 3:
        return found  # TYPED IN CAPITALS: the case tells nothing
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


def opposites(wa: set[str], wb: set[str]) -> tuple[str, str] | None:
    """A word of one side of an ``OPPOSITES`` pair in ``wa`` and of the other in ``wb`` (each
    question only on its own side): the two words, else None."""
    for x, y in OPPOSITES:
        for one, other in ((x, y), (y, x)):
            if wa & one and not wa & other and wb & other and not wb & one:
                return sorted(wa & one)[0], sorted(wb & other)[0]
    for one, other in ((wa, wb), (wb, wa)):  # connect/disconnect, install/uninstall, lock/unlock
        for word in sorted(one - other):
            undone = {p + word for p in ("un", "dis", "de")} & (other - one)
            if undone and len(word) > 3:
                return (word, undone.pop()) if one is wa else (undone.pop(), word)
    return None


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


def _frame(text: str) -> list[str]:
    return [w for w in (t.lower().replace("’", "'").split("'")[0] for t in _tokens(text)) if w in FRAME]


DETERMINERS = set("a an the this that these those some any my your our their his her its".split())
RELATIONS = ("from", "than", "vs", "versus")  # the word after one says which way round a question goes


def reordered(a: str, b: str) -> str | None:
    """The same words in another order, which embeddings barely see (0.97-0.99 measured): "Is Python
    faster than Java?" / "Is Java faster than Python?", "to the airport from downtown" / "downtown
    from the airport". What one question has in order, else None. Compound nouns reworded ("a list
    in python" / "a python list") are not reorders: the words differ ("in")."""
    ta = [_stem(t.lower()) for t in _tokens(a) if t.lower() not in DETERMINERS]
    tb = [_stem(t.lower()) for t in _tokens(b) if t.lower() not in DETERMINERS]
    wa, wb = [_stem(w) for w in _topic_words(a)], [_stem(w) for w in _topic_words(b)]
    if len(wa) > 1 and sorted(ta) == sorted(tb) and wa != wb:
        return " ".join(wa)
    for relation in RELATIONS:
        xa, xb = _after(ta, relation), _after(tb, relation)
        if xa and xb and xa != xb and xa in tb and xb in ta:
            return f"{relation} {xa} vs {relation} {xb}"
    return None


def _after(tokens: list[str], relation: str) -> str | None:
    """The first topic word after ``relation`` in ``tokens``."""
    if relation in tokens:
        return next((t for t in tokens[tokens.index(relation) + 1:] if t not in SCAFFOLD), None)
    return None


def topic_swap(a: str, b: str, embed: Embed) -> tuple[list[str], list[str]] | None:
    """The words swapped between two questions of one template ("function of a TV" / "function of
    money"): (a's, b's); None when they are not such a swap (another frame or wording, or one only
    adds words) or the swapped words are synonyms."""
    if _frame(a) != _frame(b):
        return None
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
    for i, x in enumerate(only_a):  # one side of an OPPOSITES pair is a synonym set ("lower"/"reduce")
        for j, y in enumerate(only_b):
            if any(x in side and y in side for pair in OPPOSITES for side in pair):
                sims[i, j] = 1.0
    if (sims.max(axis=1) >= SYNONYM).all() and (sims.max(axis=0) >= SYNONYM).all():
        return None
    return only_a, only_b


# Single-word embeddings, kept: the same topic words come back with every lookup. Keyed by the
# embedding object too, so a store with another model never reads these.
_word_vectors: dict[tuple[int, str], np.ndarray] = {}


def _vectors(words: tuple[str, ...], embed: Embed) -> np.ndarray:
    missing = [w for w in dict.fromkeys(words) if (id(embed), w) not in _word_vectors]
    if missing:
        if len(_word_vectors) > 20_000:
            _word_vectors.clear()
        for word, vector in zip(missing, embed(missing)):
            _word_vectors[(id(embed), word)] = np.asarray(vector, dtype=np.float32)
    return np.stack([_word_vectors[(id(embed), w)] for w in words])


def disagreement(a: str, b: str, embed: Embed | None = None) -> str | None:
    """None when two questions agree on numbers, negations, names, opposites and word order (and,
    given ``embed``, are not one template with a topic swapped); else why they differ, in a few
    words, ``a``'s side first ("numbers differ: 3 vs 4", "one is negated", "names differ: Paris vs
    London", "opposites: before vs after", "word order differs: ...", "topics differ: tv vs money")."""
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
    opposite = opposites(wa, wb)
    if opposite:
        return f"opposites: {opposite[0]} vs {opposite[1]}"
    order = reordered(a, b)
    if order:
        return f"word order differs: {order}"
    if embed is not None:
        swap = topic_swap(a, b, embed)
        if swap:
            return f"topics differ: {', '.join(swap[0])} vs {', '.join(swap[1])}"
    return None


def _show(values: set[str]) -> str:
    return ", ".join(sorted(values)) or "none"
