"""The kernel engine's tokenizer and chat template: exact renders, and cortex's bound holds."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import counting
from common.openai_schema import chat_request
from cortex.budget.estimate import prompt_tokens_bound
from neuron.engines.kernel.checkpoint import CHAT_TEMPLATE, SPECIAL_ID, preset_config, preset_tokenizer
from neuron.engines.kernel.tokenizer import ChatTemplateError, KernelTokenizer, build_byte_level_tokenizer

TOK = preset_tokenizer(preset_config("synth-tiny"))


def test_system_and_user_render_as_the_template_defines() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert TOK.render_chat(messages) == (
        "<|begin_of_text|><|system|>Be brief.<|eot_id|><|user|>Hi<|eot_id|><|assistant|>"
    )
    assert TOK.render_chat(messages, add_generation_prompt=False).endswith("<|user|>Hi<|eot_id|>")


def test_multi_turn_with_names_and_parts_renders_each_turn() -> None:
    messages = [
        {"role": "user", "content": "one", "name": "ann"},
        {"role": "assistant", "content": "two"},
        {"role": "developer", "content": [{"type": "text", "text": "th"}, {"type": "image_url", "image_url": {}},
                                          {"type": "text", "text": "ree"}]},
    ]
    assert TOK.render_chat(messages) == (
        "<|begin_of_text|><|user|>ann\none<|eot_id|><|assistant|>two<|eot_id|>"
        "<|system|>three<|eot_id|><|assistant|>"
    )


def test_tools_tool_calls_and_tool_messages_render_compact_json() -> None:
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"city\": \"Zürich\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    assert TOK.render_chat(messages, tools) == (
        "<|begin_of_text|><|tools|>"
        '[{"type":"function","function":{"name":"get","parameters":{"type":"object"}}}]'
        "<|user|>weather in Zürich?<|eot_id|>"
        '<|assistant|><|tool_call|>{"name":"get","arguments":"{\\"city\\": \\"Zürich\\"}"}<|eot_id|>'
        "<|tool|>sunny<|eot_id|><|assistant|>"
    )


def test_unknown_role_is_a_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="unknown message role: wizard"):
        TOK.render_chat([{"role": "wizard", "content": "x"}])


def test_specials_in_rendered_text_encode_as_one_token_each() -> None:
    ids = TOK.encode_chat([{"role": "user", "content": "é"}])
    assert ids == [SPECIAL_ID["<|begin_of_text|>"], SPECIAL_ID["<|user|>"], 0xC3, 0xA9, SPECIAL_ID["<|eot_id|>"],
                   SPECIAL_ID["<|assistant|>"]]
    assert TOK.decode(ids, skip_special_tokens=False) == TOK.render_chat([{"role": "user", "content": "é"}])
    assert TOK.decode(ids) == "é"


@given(st.text(max_size=200))
def test_byte_level_is_one_token_per_utf8_byte_and_round_trips(text: str) -> None:
    ids = TOK.encode(text)
    if not any(s in text for s in SPECIAL_ID):
        assert ids == list(text.encode("utf-8"))
    assert TOK.decode(ids, skip_special_tokens=False) == text


def test_an_incomplete_utf8_tail_decodes_to_the_replacement_character() -> None:
    assert TOK.decode(list("a😀".encode())[:-2]) == "a\ufffd"


def test_kind_eos_and_overheads_of_the_preset() -> None:
    assert TOK.kind == "byte-level"
    assert TOK.vocab_size == 256 + len(SPECIAL_ID)
    assert TOK.bos_token_id == SPECIAL_ID["<|begin_of_text|>"]
    assert TOK.eos_token_ids == {SPECIAL_ID["<|eot_id|>"], SPECIAL_ID["<|end_of_text|>"]}
    # role marker + <|eot_id|> + the newline after a name; bos + <|tools|> + the assistant opener
    assert (TOK.message_overhead_tokens, TOK.reply_primer_tokens) == (3, 3)
    assert TOK.message_overhead_tokens <= counting.MESSAGE_OVERHEAD_TOKENS
    assert TOK.reply_primer_tokens <= counting.REPLY_PRIMER_TOKENS


def test_rendering_follows_transformers_jinja_settings() -> None:
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indent before one;
    # tojson keeps non-ASCII; raise_exception aborts the render.
    template = "{% for m in messages %}\n    {{ m['content'] | tojson }}\n{% endfor %}{{ bos_token }}"
    tok = KernelTokenizer(build_byte_level_tokenizer(["<s>"]), {"bos_token": "<s>"}, chat_template=template)
    assert tok.render_chat([{"role": "user", "content": "é"}, {"role": "user", "content": "b"}]) == (
        '    "é"\n    "b"\n<s>'
    )
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = KernelTokenizer(build_byte_level_tokenizer(["<|im_start|>", "<|im_end|>"]), {}, chat_template=chatml)
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    refusing = "{{ raise_exception('no system messages') }}"
    tok = KernelTokenizer(build_byte_level_tokenizer([]), {}, chat_template=refusing)
    with pytest.raises(ChatTemplateError, match="no system messages"):
        tok.render_chat([{"role": "system", "content": "x"}])


def test_a_template_that_does_not_compile_names_the_field() -> None:
    from neuron.engines.kernel.config import KernelConfigError

    with pytest.raises(KernelConfigError, match="chat_template"):
        KernelTokenizer(build_byte_level_tokenizer([]), {}, chat_template="{% for %}")


def test_the_shipped_template_is_the_presets() -> None:
    assert TOK.chat_template_source == CHAT_TEMPLATE


# -- cortex's reservation bound ------------------------------------------------------------------

from tests.chat_strategies import _message, _text, _tools  # noqa: E402


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_message(), min_size=1, max_size=8), _tools)
def test_cortex_bound_covers_real_count(messages: list[dict], tools: list[dict] | None) -> None:
    real = len(TOK.encode_chat(messages, tools))
    # The bound as the tokenizer advertises it: bytes of each message's text (and name) plus the
    # per-message overhead, plus the primer; tool calls and tools at their compact JSON size.
    bound = TOK.reply_primer_tokens
    for m in messages:
        bound += TOK.message_overhead_tokens + counting.count_text(counting.message_text(m))
        bound += counting.count_text(m["name"]) if isinstance(m.get("name"), str) else 0
        bound += len(json.dumps(m["tool_calls"], separators=(",", ":"), ensure_ascii=False).encode()) if m.get("tool_calls") else 0
    bound += len(json.dumps(tools, separators=(",", ":"), ensure_ascii=False).encode()) if tools else 0
    assert bound >= real
    # And cortex's own estimate of the same request, with its 4/3 constants.
    body = {"model": "synth-tiny", "messages": messages, **({"tools": tools} if tools else {})}
    assert prompt_tokens_bound(chat_request(body)) >= real


LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's template: bos on the first message only, trimmed content
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3 = KernelTokenizer(
    build_byte_level_tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, chat_template=LLAMA3_TEMPLATE,
)


def test_overheads_are_measured_from_any_template() -> None:
    # header markers, the role (at most "assistant"), "\n\n", <|eot_id|>, and bos on the first message
    assert LLAMA3.message_overhead_tokens == 1 + len("assistant") + 1 + 2 + 1 + 1
    assert LLAMA3.reply_primer_tokens == 1 + len("assistant") + 1 + 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.builds(lambda role, text: {"role": role, "content": text},
                          st.sampled_from(["system", "user", "assistant"]), _text), min_size=1, max_size=6))
def test_measured_overheads_bound_a_non_additive_template(messages: list[dict]) -> None:
    real = len(LLAMA3.encode_chat(messages))
    bound = LLAMA3.reply_primer_tokens + sum(LLAMA3.message_overhead_tokens + counting.count_text(m["content"])
                                             for m in messages)
    assert bound >= real


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_message(), min_size=1, max_size=6))
def test_cortex_bound_from_what_the_neuron_advertises_covers_a_dear_template(messages: list[dict]) -> None:
    # Llama 3's template costs far more per message than common/counting's 4: cortex must use what
    # the neuron advertises for the model, read through its own kind adapter, to stay an upper bound.
    from cortex.fleet.kinds import KINDS
    from cortex.fleet.registry import model_info

    entry = {"id": "llama3", "limit": {"context": 10**6, "output": 10},
             "tokenizer": {"kind": LLAMA3.kind, "message_overhead_tokens": LLAMA3.message_overhead_tokens,
                           "reply_primer_tokens": LLAMA3.reply_primer_tokens}}
    parsed = KINDS["neuron"].parse_models({"/v1/models": {"data": [entry]}})["llama3"]
    info = model_info(parsed, 0, 0)
    plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages if m.get("role") != "tool"]
    plain = [m for m in plain if isinstance(m.get("content"), str)] or [{"role": "user", "content": "hi"}]
    real = len(LLAMA3.encode_chat(plain))
    assert prompt_tokens_bound(chat_request({"model": "llama3", "messages": plain}), info) >= real
