"""The Gemma chat format, exactly as the official Gemma / Gemma 2 template renders it.

    <bos><start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n{content}<end_of_turn>\n

Roles alternate user/assistant starting with the user; a system turn is rejected, as the official
Gemma 1/2 template does. We take the template string from TRL, which ships Google's template verbatim:
being byte-identical is what lets TRL swap in its `{% generation %}` variant for assistant-only loss.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
CONTROL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN]
"""Gemma's control tokens, in the order of their ids in Gemma's vocabulary (pad=0, eos=1, bos=2, unk=3)."""


def _trl_gemma_template() -> str:
    """TRL's copy of the Gemma template, read from its package dir (importing trl costs ~5 s)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("trl is not installed; posttrain needs it (pip install trl)")
    return (Path(spec.submodule_search_locations[0]) / "chat_templates" / "gemma.jinja").read_text(encoding="utf-8")


GEMMA_CHAT_TEMPLATE: str = _trl_gemma_template()


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render a conversation in the Gemma format without a tokenizer (same output as the template)."""
    validate_roles(messages)
    out = [BOS]
    for m in messages:
        role = "model" if m["role"] == "assistant" else "user"
        out.append(f"{START_OF_TURN}{role}\n{m['content'].strip()}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


def check_gemma_format(tokenizer, where: str) -> None:
    """Raise ValueError unless the tokenizer's chat template renders a conversation as `render` does: every stage
    trains, samples and releases in the Gemma turn format (a ChatML template, say, would fail only at release)."""
    probe = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    if rendered != render(probe, add_generation_prompt=True):
        raise ValueError(
            f"{where}: the tokenizer's chat template does not render the Gemma turn format posttrain trains in "
            f"(got {rendered!r}); use a Gemma-format chat model, or remove chat_template from its "
            f"tokenizer_config.json so the Gemma template is used (its vocabulary needs <start_of_turn>)"
        )


def validate_roles(messages: list[dict]) -> None:
    """Raise ValueError unless roles alternate user, assistant, user, ... with string content."""
    if not messages:
        raise ValueError("conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected an object with 'role' and 'content'")
        if m["role"] == "system":
            raise ValueError(f"message {i}: system turns are not supported by the Gemma chat format")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {i}: role {m['role']!r}, expected {expected!r} (roles must alternate)")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string")


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the generation prompt (`<start_of_turn>model\\n`)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def rendered_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a whole conversation rendered with the chat template (no generation prompt)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
