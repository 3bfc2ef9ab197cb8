"""Hypothesis strategies for chat requests: unicode (astral, combining, special-token look-alikes), tools, long texts.

Shared by the kernel template tests and the exact-count tests, which both compare a rendered count with a bound.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

_astral = st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, categories=["So", "Lo", "Sm", "Co"])
_combining = st.sampled_from(["e\u0301", "a\u0308\u0304", "\u0915\u094d\u0937", "n\u0303", "\U0001F469\u200d\U0001F4BB",
                              "\U0001F44D\U0001F3FD", "\u0301"])
_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x80, codec="utf-8"), max_size=40),
    st.lists(st.one_of(_astral.map(str), _combining, st.text(max_size=3)), max_size=20).map("".join),
    st.text(max_size=4000),  # long
    st.sampled_from(["", "<|eot_id|>", "<|user|>hi", "\n\n", "{\"a\":1}", " <|assistant|> ", "<|eot_id"]),
)
_name = st.one_of(st.none(), st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=12))
_call = st.builds(
    lambda i, name, args: {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}},
    st.integers(0, 99), st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=10),
    st.builds(json.dumps, st.dictionaries(st.text(max_size=5), _text, max_size=3)),
)


@st.composite
def _message(draw: st.DrawFn, roles: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")) -> dict:
    role = draw(st.sampled_from(roles))
    message: dict = {"role": role}
    if draw(st.booleans()):
        message["content"] = draw(_text)
    else:
        message["content"] = [{"type": "text", "text": draw(_text)} for _ in range(draw(st.integers(1, 3)))]
    name = draw(_name)
    if name is not None and role in ("system", "user", "assistant"):
        message["name"] = name
    if role == "tool":
        message["tool_call_id"] = "call_1"
    if role == "assistant" and draw(st.booleans()):
        message["tool_calls"] = draw(st.lists(_call, min_size=1, max_size=3))
        if draw(st.booleans()):
            message["content"] = None
    return message


_schema = st.recursive(
    st.sampled_from([{"type": "string"}, {"type": "integer"}, {"type": "boolean"}]),
    lambda inner: st.builds(lambda props: {"type": "object", "properties": props},
                            st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)),
    max_leaves=6,
)
_tools = st.one_of(st.none(), st.lists(st.builds(
    lambda name, desc, params: {"type": "function", "function": {"name": name, "description": desc, "parameters": params}},
    st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=8), _text, _schema,
), min_size=1, max_size=4))
