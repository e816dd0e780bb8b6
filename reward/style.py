"""Rule rewards that need no metadata: they judge an answer by its form and its prompt alone, so they work on
any prompt set (your own data, with no task or answer columns). Reference them by path:

    ppo:
      scoring:
        rules:
          - {path: reward/style.py, function: well_formed, weight: 1.0}
          - {path: reward/style.py, function: on_topic, weight: 0.5}

Each takes the prompts (message lists) and completions (text), ignores other columns, and returns one float
per completion in [0, 1].
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z']+")
STOPWORDS = frozenset(
    "a an the of to in on for and or is are be was it me my i you your this that what which "
    "how do does can could would should with about one some give tell say write".split()
)
"""Words too common to show that an answer is about its prompt."""


def well_formed(prompts, completions, min_words: int = 3, max_words: int = 40, **_) -> list[float]:
    """Partial credit for a well-formed sentence, a quarter for each of: it starts with a capital letter; it
    ends with '.', '!' or '?'; it has between `min_words` and `max_words` words; no word is said twice in a
    row (a stutter). Empty answers score 0."""
    out = []
    for text in completions:
        t = text.strip()
        words = t.split()
        if not words:
            out.append(0.0)
            continue
        lowered = [w.lower().strip(".,!?") for w in words]
        checks = (
            t[0].isupper(),
            t[-1] in ".!?",
            min_words <= len(words) <= max_words,
            all(a != b for a, b in zip(lowered, lowered[1:])),
        )
        out.append(sum(checks) / len(checks))
    return out


def _content_words(text: str) -> set[str]:
    return {w for w in (m.lower() for m in _WORD.findall(text)) if len(w) > 2 and w not in STOPWORDS}


def on_topic(prompts, completions, **_) -> list[float]:
    """1.0 when the answer uses a content word of the last user turn (the thing or person asked about), else
    0.0; prompts without content words count as met."""
    out = []
    for prompt, text in zip(prompts, completions, strict=True):
        asked = _content_words(prompt[-1]["content"]) if prompt else set()
        out.append(1.0 if not asked or asked & _content_words(text) else 0.0)
    return out
