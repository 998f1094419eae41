"""Classifying a question as simple, medium or complex, cheaply (well under a millisecond).

Points for what makes a question need more than a quick answer:
  length         +1 over 15 words, +2 over 40 words
  parts          +1 per part beyond the first (several "?", numbered or bulleted lines,
                 "and also" / "as well as" / ";" joining requests), at most +3
  asks for depth +2 for words that ask for analysis: why/how-does, compare, trade-offs,
                 pros and cons, implications, evaluate, design, strategy, ...
  domain terms   +1 per technical/professional term (architecture, latency, regression,
                 contract, diagnosis, ...), at most +2
Score 0-1: simple; 2-3: medium; 4 or more: complex. A greeting or a one-line fact question
stays simple; a multi-part request for analysis becomes complex.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEPTH = re.compile(
    r"\b(why|how (?:does|do|can|would|should)|compare|comparison|versus|vs\.?|trade-?offs?|pros and cons|"
    r"implications?|evaluate|assess|analy[sz]e|analysis|design|strategy|plan|recommend|should i|"
    r"advantages|disadvantages|risks?|explain|step by step)\b",
    re.IGNORECASE,
)
DOMAIN = re.compile(
    r"\b(architecture|algorithm|complexity|latency|throughput|concurrency|database|distributed|"
    r"kubernetes|security|encryption|regression|statistic\w*|probability|derivative|integral|"
    r"contract|liability|diagnos\w*|symptom\w*|investment|portfolio|tax\w*|mortgage|protocol|"
    r"compiler|kernel|scalab\w*|migration|microservices?|machine learning|neural|quantum)\b",
    re.IGNORECASE,
)
PART_JOINERS = re.compile(r"\b(and also|as well as|additionally|then also)\b|;", re.IGNORECASE)
LIST_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+", re.MULTILINE)


@dataclass(frozen=True)
class Route:
    """The router's verdict: the question's class and why."""

    kind: str  # simple | medium | complex
    score: int
    reason: str


def classify(question: str) -> Route:
    words = len(question.split())
    reasons: list[str] = []
    score = 0
    if words > 40:
        score += 2
        reasons.append(f"{words} words")
    elif words > 15:
        score += 1
        reasons.append(f"{words} words")
    parts = max(question.count("?"), 1) - 1 + len(LIST_LINE.findall(question)) + len(PART_JOINERS.findall(question))
    if parts:
        score += min(parts, 3)
        reasons.append(f"{parts + 1} parts")
    depth = DEPTH.findall(question)
    if depth:
        score += 2
        reasons.append(f"asks for analysis ({depth[0].lower()})")
    domain = {m.lower() for m in DOMAIN.findall(question)}
    if domain:
        score += min(len(domain), 2)
        reasons.append("domain terms (" + ", ".join(sorted(domain)[:3]) + ")")
    kind = "simple" if score <= 1 else "medium" if score <= 3 else "complex"
    return Route(kind, score, f"{kind}: " + ("; ".join(reasons) if reasons else "short, single question"))


TOPICS = {
    "code": r"\b(code|python|javascript|rust|function|bug|compile\w*|api|sql|database|git|regex|program\w*|script)\b",
    "math": r"\b(math|equation|integral|derivative|probability|statistic\w*|prime|algebra|calculate|sum of)\b",
    "health": r"\b(health|symptom\w*|diet|sleep|exercise|doctor|medicine|pain|diagnos\w*)\b",
    "money": r"\b(money|budget|invest\w*|tax\w*|mortgage|loan|salary|price|cost|portfolio)\b",
    "travel": r"\b(travel|trip|flight|hotel|visa|holiday|vacation)\b",
    "writing": r"\b(write|essay|poem|story|email|letter|summari[sz]e|translate|rewrite)\b",
    "science": r"\b(physics|chemistry|biology|planet|atom|energy|climate|evolution|astronomy|sky)\b",
}
TOPIC_PATTERNS = {name: re.compile(pattern, re.IGNORECASE) for name, pattern in TOPICS.items()}


def topic(question: str) -> str:
    """A coarse topic from keywords: the one with most matches, else "general"."""
    counts = {name: len(p.findall(question)) for name, p in TOPIC_PATTERNS.items()}
    best = max(counts, key=counts.get)
    return best if counts[best] else "general"


def question_type(question: str, route: Route) -> str:
    """What the learner keys on: the router's class and the topic, e.g. "complex/code"."""
    return f"{route.kind}/{topic(question)}"
