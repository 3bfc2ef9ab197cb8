"""The byte-level tokenizer and chat template of neuron's engines.

Exact and documented, so that a budget estimate can be exact too:

* one token per UTF-8 byte of text;
* a chat prompt is rendered message by message; each message costs the
  bytes of its text (and of its `name`, if any) plus MESSAGE_OVERHEAD_TOKENS
  for the role markers of the template;
* the reply primer that opens the assistant turn costs REPLY_PRIMER_TOKENS;
* a legacy completion prompt is its bytes, with no template.
"""

from __future__ import annotations

from typing import Any

MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMER_TOKENS = 3


def message_text(message: dict[str, Any]) -> str:
    """The text a message contributes to the prompt (text parts only)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def render_chat(messages: list[dict[str, Any]]) -> str:
    """The rendered prompt; the mock engine seeds its reply from it."""
    parts = []
    for message in messages:
        parts.append(f"<|{message['role']}|>{message.get('name') or ''}\n{message_text(message)}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def count_text(text: str) -> int:
    return len(text.encode("utf-8"))


def count_chat(
    messages: list[dict[str, Any]],
    message_overhead_tokens: int = MESSAGE_OVERHEAD_TOKENS,
    reply_primer_tokens: int = REPLY_PRIMER_TOKENS,
) -> int:
    """The rendered prompt's tokens for a byte-level tokenizer whose template costs
    `message_overhead_tokens` per message and `reply_primer_tokens` for the reply primer
    (by default this module's own template; an engine with another one advertises its costs)."""
    total = reply_primer_tokens
    for message in messages:
        total += message_overhead_tokens + count_text(message_text(message))
        name = message.get("name")
        if isinstance(name, str):
            total += count_text(name)
    return total
