"""Text prompts of common words, for servers whose /v1/completions takes no token ids (Ollama): the load's
prompts and Ollama's long request. A word is about one token (with its leading space) in BPE vocabularies;
how many tokens a prompt really is, only the server says (usage.prompt_tokens): the callers calibrate.
"""

from __future__ import annotations

import math

# common words, most one token each with a leading space; all distinct (a prompt's head spells a number in them)
_WORD_TEXT = (
    "the of and to in is was for on are with as at be this have from or one had by word but not what all were "
    "we when your can said there use an each which she do how their if will up other about out many then them "
    "these so some her would make like him into time has look two more write go see number no way could people "
    "my than first water been call who oil its now find long down day did get come made may part"
)
WORDS = tuple(_WORD_TEXT.split())


def text(n: int, start: int) -> str:
    """n words cycling through WORDS; another `start`, another first word."""
    return " ".join(WORDS[(start * 7 + i) % len(WORDS)] for i in range(n))


def token_line(w1: int, p1: int, w2: int, p2: int) -> tuple[float, float]:
    """(tokens per word, fixed tokens) through two prompts of w1 and w2 words the server counted as p1 and p2
    tokens: a chat template's fixed part, then about one token per word."""
    rate = (p2 - p1) / (w2 - w1)
    return rate, p1 - rate * w1


def head_words(numbers: int) -> int:
    """Words that spell any number below `numbers` in base len(WORDS)."""
    return max(1, math.ceil(math.log(numbers) / math.log(len(WORDS))))


def unique_text(n: int, number: int, numbers: int) -> str:
    """n words (at least head_words(numbers)) whose first ones spell `number` (< numbers) in base len(WORDS),
    lowest digit first: another number, another first words, so a prefix cache serves no two prompts alike
    (beyond a chat template's fixed start). The rest is text(), the same for every number."""
    head = []
    for _ in range(head_words(numbers)):
        number, d = divmod(number, len(WORDS))
        head.append(WORDS[d])
    rest = max(0, n - len(head))
    return " ".join(head + ([text(rest, 0)] if rest else []))
