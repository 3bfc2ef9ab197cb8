"""KernelTokenizer: a `tokenizers.Tokenizer` plus tokenizer_config.json's chat template.

The template is compiled and rendered by `common.chat_template`, the way
transformers' `apply_chat_template` does; cortex counts prompts exactly with
the same code (cortex/budget/exact_count.py). The rendered text is then
encoded with its special tokens parsed as specials.

`message_overhead_tokens` and `reply_primer_tokens` are measured from the
template by rendering probe conversations, so cortex's reservation
(1 token per UTF-8 byte of text plus a per-message overhead) can use them
as upper bounds; see `measure_overheads`.

`files_document` is what neuron serves cortex at the URL its `/v1/models`
entry advertises (common/chat_template.py `tokenizer_document`): this
tokenizer and its config, with the chat template it renders (from the
config, or a chat_template.jinja beside it), so cortex counts with the very
files the engine encodes with.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from common.chat_template import (
    LIMIT_RENDERED_CHARS,
    LIMIT_TEMPLATE_CHARS,
    ChatTemplate,
    ChatTemplateError,
    TokenizerFilesError,
    compile_template,
    tokenizer_document,
    read_tokenizer,
    read_tokenizer_config,
    special_tokens,
    template_source,
)
from neuron.engines.kernel.config import KernelConfigError, read_json, token_ids

# Text longer than this is encoded with encode_batch, which releases the GIL: encode holds it
# for the whole text (a 3 MB prompt stalled the event loop 2.5 s, even from a worker thread).
RELEASE_GIL_CHARS = 16 * 1024

__all__ = [
    "LIMIT_RENDERED_CHARS", "LIMIT_TEMPLATE_CHARS", "ChatTemplateError", "KernelTokenizer", "bytes_to_unicode",
    "build_byte_level_tokenizer", "compile_template", "load_tokenizer",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_byte_level_tokenizer(specials: list[str]) -> Tokenizer:
    """Token id b is byte b (0..255); then one id per special, in order.

    A BPE model with no merges over GPT-2's byte alphabet: every UTF-8 byte of
    text is one token, any text round-trips, and an incomplete UTF-8 tail
    decodes to U+FFFD.
    """
    alphabet = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tok.get_vocab_size() == 256 + len(specials)
    return tok


def _is_byte_level(spec: dict[str, Any]) -> bool:
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    return (model.get("type") == "BPE" and not model.get("merges") and len(model.get("vocab") or {}) == 256
            and pre.get("type") == "ByteLevel")


def _kind(spec: dict[str, Any]) -> str:
    if _is_byte_level(spec):
        return "byte-level"
    model_type = (spec.get("model") or {}).get("type")
    pre = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("normalizer"))
    if model_type == "BPE" and "ByteLevel" in pre:
        return "bpe"  # byte-level BPE: GPT-2, Llama 3, Qwen2
    if model_type == "BPE" or model_type == "Unigram":
        return "sentencepiece"  # Llama 2 / TinyLlama style: BPE or Unigram with Metaspace and byte fallback
    return str(model_type or "unknown").lower()


def _json_bytes(value: Any) -> int:
    """What cortex's estimate charges for a JSON field: compact, non-ASCII kept."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _message_bytes(message: dict[str, Any]) -> int:
    """The bytes cortex counts for one message: text parts, a string name, and tool_calls as JSON."""
    content = message.get("content")
    total = 0
    if isinstance(content, str):
        total += len(content.encode())
    elif isinstance(content, list):
        total += sum(len(p.get("text", "").encode()) if p.get("type") == "text" else _json_bytes(p) for p in content)
    if isinstance(message.get("name"), str):
        total += len(message["name"].encode())
    if message.get("tool_calls"):
        total += _json_bytes(message["tool_calls"])
    return total


_PROBE_TOOL = {"type": "function", "function": {"name": "f", "description": "d",
                                                 "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def _probe_messages() -> list[dict[str, Any]]:
    probes: list[dict[str, Any]] = []
    for role in ("system", "user", "assistant", "tool"):
        for name in (None, "n"):
            message: dict[str, Any] = {"role": role, "content": "x"}
            if name:
                message["name"] = name
            if role == "tool":
                message["tool_call_id"] = "c"
            probes.append(message)
    probes.append({"role": "assistant", "content": None, "tool_calls": [_PROBE_CALL]})
    probes.append({"role": "assistant", "content": "x", "tool_calls": [_PROBE_CALL, _PROBE_CALL]})
    return probes


class KernelTokenizer:
    """The contract's tokenizer: encode/decode, the chat template, and cortex's bounds."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_config: dict[str, Any], *, chat_template: str | None,
                 eos_token_ids: frozenset[int] = frozenset(), bos_token_id: int | None = None,
                 source: str = "tokenizer_config.json") -> None:
        self._tok = tokenizer
        spec = json.loads(tokenizer.to_str())
        self.kind = _kind(spec)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokenizer_config = dict(tokenizer_config)
        self.special_tokens = special_tokens(tokenizer_config)
        config_bos = self.token_id(self.special_tokens.get("bos_token"))
        self.bos_token_id = bos_token_id if bos_token_id is not None else config_bos
        eos = set(eos_token_ids)
        config_eos = self.token_id(self.special_tokens.get("eos_token"))
        if config_eos is not None:
            eos.add(config_eos)
        self.eos_token_ids = frozenset(e for e in eos if 0 <= e)
        added = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._specials_re = re.compile("|".join(re.escape(a) for a in added)) if added else None
        self.chat_template_source = chat_template
        self._template: ChatTemplate | None = None
        if chat_template is not None:
            try:
                self._template = ChatTemplate(chat_template, self.special_tokens, where=source)
            except TokenizerFilesError as exc:
                raise KernelConfigError(str(exc)) from None
        self.message_overhead_tokens, self.reply_primer_tokens = self.measure_overheads()

    # -- tokens -------------------------------------------------------------------------------

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > RELEASE_GIL_CHARS:  # encode holds the GIL throughout; encode_batch lets it go
            return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are left out unless asked for. May end in U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def bound_tokens(self, text: str) -> int:
        """An upper bound on len(encode(text)): one per special token plus one per other UTF-8 byte.

        Exact for the byte-level presets; a bound for any tokenizer whose
        tokens each cover at least one byte (byte-level BPE, byte fallback).
        """
        if self._specials_re is None:
            return len(text.encode())
        specials = 0
        rest = 0
        last = 0
        for m in self._specials_re.finditer(text):
            specials += 1
            rest += len(text[last:m.start()].encode())
            last = m.end()
        return specials + rest + len(text[last:].encode())

    def files_document(self) -> bytes | None:
        """tokenizer.json's text and tokenizer_config.json's object, its `chat_template` the one this
        tokenizer renders, as one JSON document (common/chat_template.py); None without a template
        (cortex cannot count a chat prompt) or with text JSON cannot carry."""
        if self.chat_template_source is None:
            return None
        config = {**self.tokenizer_config, "chat_template": self.chat_template_source}
        try:
            return tokenizer_document(self._tok.to_str(), config)
        except (UnicodeEncodeError, TypeError, ValueError):
            return None

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json: 'chat_template')")
        return self._template.render(messages, tools, add_generation_prompt)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        # The template writes bos itself: transformers encodes its output with add_special_tokens=False.
        return self.encode(self.render_chat(messages, tools), add_special_tokens=False)

    def measure_overheads(self) -> tuple[int, int]:
        """(per-message overhead, reply primer) in tokens beyond the bytes cortex counts.

        The primer is what a conversation costs besides its messages: bos,
        the assistant turn opener, and the markers around a `tools` block
        (whose JSON cortex counts). The overhead is the most any one probe
        message costs beyond its bytes; multi-message probes raise it if the
        template is not additive. Exact for the presets' additive template.
        """
        if self._template is None:
            return 0, 0
        margin = 0 if self.kind == "byte-level" else 1  # a prefix space a segment boundary may add

        def excess(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
            text = self.render_chat(messages, tools)
            return self.bound_tokens(text) - sum(_message_bytes(m) for m in messages) - (_json_bytes(tools) if tools else 0)

        probes = _probe_messages()
        try:
            bare, with_tools = excess([]), excess([], [_PROBE_TOOL])
        except ChatTemplateError:
            bare = with_tools = 0  # a template that needs a message: its share lands in the overhead below
        primer = max(bare, with_tools)
        overhead = 0
        for message in probes:
            try:
                overhead = max(overhead, excess([message]) - bare, excess([message], [_PROBE_TOOL]) - with_tools)
            except ChatTemplateError:
                continue  # e.g. a template that refuses a tool message without a call before it
        user, assistant = {"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}
        for conversation in ([{"role": "system", "content": "x"}, user, assistant, user],
                             [user, {"role": "assistant", "content": None, "tool_calls": [_PROBE_CALL]},
                              {"role": "tool", "content": "x", "tool_call_id": "c"}, user]):
            try:
                total = excess(conversation) - bare
            except ChatTemplateError:
                continue
            overhead = max(overhead, -(-total // len(conversation)))
        return overhead + margin, primer + margin


def load_tokenizer(directory: str, *, config_bos: int | None, config_eos: tuple[int, ...]) -> KernelTokenizer:
    """tokenizer.json, tokenizer_config.json, and eos ids from generation_config.json if present."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise KernelConfigError(f"tokenizer.json: file not found in {directory} (the tokenizer is required)")
    config_path = os.path.join(directory, "tokenizer_config.json")
    try:
        tok = read_tokenizer(path)
        tok_config = read_tokenizer_config(config_path) if os.path.isfile(config_path) else {}
        template = template_source(tok_config, directory)
    except TokenizerFilesError as exc:
        raise KernelConfigError(str(exc)) from None
    eos = set(config_eos)
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        gen = read_json(gen_path)
        if isinstance(gen, dict):
            eos.update(token_ids(gen.get("eos_token_id"), "generation_config.json", "eos_token_id"))
    return KernelTokenizer(tok, tok_config, chat_template=template, eos_token_ids=frozenset(eos),
                           bos_token_id=config_bos)
