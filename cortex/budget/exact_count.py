"""Exact prompt counts on a model's own tokenizer and chat template, with a prefix cache.

Where the catalogue names a model's `tokenizer.json`, or else the model's
neurons advertise theirs (neuron's kernel engine serves its files, fetched
once per sha256 by cortex/fleet/tokenizers.py and health.py), cortex renders
a chat request with the model's template exactly as the engine does
(`common.chat_template`, the code neuron's kernel engine renders with) and
counts it with the `tokenizers` library. The estimate then holds that
count instead of the byte bound.

**The prefix cache.** Agents resend the same growing conversation, so the
costly step, encoding, is done only for the text after the longest rendered
prefix seen before. Counts are not additive across an arbitrary cut of a
string (a BPE merge or a pre-tokenizer split may straddle it), so the cut is
made only at a *safe boundary*: the start of an added token (a special such
as `<|user|>` or `<|start_header_id|>`) that is matched on the raw text
(`normalized: false`), does not absorb the whitespace before it (`lstrip`)
and does not depend on its neighbours (`single_word`). The `tokenizers`
library splits its input at such tokens before it normalizes, pre-tokenizes
or merges anything, and treats each piece on its own; so the tokens before
the boundary depend only on the text before it, and the text from the
boundary on (which starts with that token, so no piece of it sits at offset
0, where a Metaspace `prepend_scheme = "first"` would act) encodes alone to
the same tokens it has inside the whole. Hence

    count(text) = count(text[:b]) + count(text[b:])

with the first term from the cache, keyed by a BLAKE2b digest of
`text[:b]`. Each claim is checked as it is used: a cached count comes from a
full encoding where the boundary token was seen at exactly that offset, and
a suffix is accepted only if it encodes to that token first. Otherwise the
whole text is encoded again. tests/test_exact_count.py checks the cached
count against a fresh full count over random growing conversations, on the
shipped byte-level tokenizer and on trained BPE and Metaspace ones.

What is left proportional to the whole prompt: the jinja render and the
hash of the rendered text, both at memory speed. Encoding, the dominant
cost, covers only the new text (see scripts/bench_exact_count.py).

**Bounds.** The cache holds counts, not text or ids, at ENTRY_BYTES each,
and evicts the least recently used entry beyond `cache_bytes_max`. Within a
long prefix, boundaries are kept at least `stride_chars` apart (plus the
last few of every request, where the next request of the conversation will
branch off), so a request adds O(chars / stride) entries.

**Threads.** The counter is shared by every request for the model and is
called from worker threads (`trio.to_thread.run_sync`) for large prompts:
the template and tokenizer are used read-only, and the cache is guarded by
a lock. A large text is encoded with `encode_batch`, which releases the GIL
(`encode` holds it for the whole encoding, which would stall the event
loop's thread as much as counting on it).

**None** means "cannot count exactly here": a render error (the engine
would refuse the request, or the template needs what cortex does not know),
non-text content parts (an engine may add image tokens the template does
not show), request fields that change the render on some servers
(`chat_template_kwargs`, ...), or an encoding failure. The caller then
keeps the byte bound.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from common.chat_template import ChatTemplateError, TokenizerFiles, load_files
from common.openai_schema import GenerationRequest

CACHE_BYTES_MAX = 16 << 20
# One entry: a 32-byte digest as a bytes key (65 B), an int (28 B), an OrderedDict link and
# its dict slot (~100 B): rounded up.
ENTRY_BYTES = 224
STRIDE_CHARS = 512
TAIL_BOUNDARIES = 8  # of every request, cached whatever the stride
DIGEST_BYTES = 32
# Above this, encode through `encode_batch`, which releases the GIL (`encode` holds it throughout:
# a worker thread counting a large prompt would otherwise stall the event loop just the same).
GIL_FREE_CHARS_MIN = 4096
# A prompt with fewer characters is counted on the event loop (cold, < ~1 ms at ~0.5 µs a
# character); a larger one in a worker thread (scripts/bench_exact_count.py measures both).
INLINE_CHARS_MAX = 2048
# Fields some servers read to render differently (vLLM, SGLang): an exact count cannot know how.
RENDER_FIELDS = ("chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
                 "documents")


@dataclass(frozen=True)
class _Boundary:
    pos: int  # character offset in the rendered text where the boundary token starts
    token_id: int


@dataclass
class CounterStats:
    counts: int = 0
    hits: int = 0  # counts that reused a cached prefix
    misses: int = 0  # counts that encoded the whole text
    refused: int = 0  # counts that returned None
    encoded_chars: int = 0  # characters given to the tokenizer, in all
    last_encoded_chars: int = 0
    evictions: int = 0


def _safe_tokens(tokenizer: Tokenizer) -> tuple[dict[str, int], list[str]]:
    """(boundary-safe added tokens -> id, every raw-matched added token): see the module docstring."""
    safe: dict[str, int] = {}
    raw: list[str] = []
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        if added.normalized or not added.content:
            continue  # matched after normalization: no safe cut on the raw text
        raw.append(added.content)
        if not added.lstrip and not added.single_word:
            safe[added.content] = token_id
    return safe, raw


class ExactCounter:
    """The exact prompt count of one model's requests, with a prefix cache. Thread-safe."""

    def __init__(self, files: TokenizerFiles, *, cache_bytes_max: int = CACHE_BYTES_MAX,
                 stride_chars: int = STRIDE_CHARS, render_fields: tuple[str, ...] = RENDER_FIELDS) -> None:
        """`render_fields`: the request fields the engine may render differently with (a count is
        then unknown); () for an engine known to ignore them all (neuron's kernel engine)."""
        assert cache_bytes_max >= 0 and stride_chars >= 1
        self.template = files.template
        self.render_fields = render_fields
        # Our own copy: no truncation or padding, whatever tokenizer.json says (transformers and
        # vLLM encode a chat prompt whole; a truncated count would not bound the hold).
        self._tok = Tokenizer.from_str(files.tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._safe, raw = _safe_tokens(self._tok)
        # Leftmost-longest, as the tokenizers library matches added tokens.
        ordered = sorted(raw, key=len, reverse=True)
        self._added_re = re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None
        self.entries_max = cache_bytes_max // ENTRY_BYTES
        self.stride_chars = stride_chars
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CounterStats()

    @classmethod
    def from_paths(cls, tokenizer_path: str, config_path: str | None = None, **kwargs: Any) -> "ExactCounter":
        return cls(load_files(tokenizer_path, config_path), **kwargs)

    @property
    def cache_bytes(self) -> int:
        return len(self._cache) * ENTRY_BYTES

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- the public counts ------------------------------------------------------------------------

    def count(self, gen: GenerationRequest) -> int | None:
        """The prompt tokens the engine will count for `gen`, or None where that is not known."""
        if gen.kind == "completion":
            return self.count_completion(gen.prompt)
        if any(gen.body.get(f) is not None for f in self.render_fields):
            return self._refuse()
        return self.count_chat(gen.messages, gen.tools or None)

    def count_completion(self, prompt: str) -> int | None:
        """A legacy prompt: its tokens with the tokenizer's own specials (a BOS), no template."""
        try:
            ids = self._encode(prompt, add_special_tokens=True).ids
        except Exception:  # tokenizers raises bare exceptions
            return self._refuse()
        self._note(len(prompt), hit=False)
        return len(ids) or self._refuse()

    def count_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                   add_generation_prompt: bool = True) -> int | None:
        """The rendered prompt's tokens, as the engine encodes them (its specials parsed as specials)."""
        if self.template is None or not _text_only(messages):
            return self._refuse()
        try:
            text = self.template.render(messages, tools, add_generation_prompt)
        except ChatTemplateError:
            return self._refuse()
        try:
            return self.count_text(text)
        except Exception:  # tokenizers raises bare exceptions; a surrogate cannot be hashed
            return self._refuse()

    def count_fresh(self, text: str) -> int:
        """A full encoding, no cache: what the engine does (add_special_tokens=False, as transformers)."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    # -- the cache ----------------------------------------------------------------------------------

    def count_text(self, text: str) -> int:
        """len(encode(text)), reusing the longest cached prefix that ends at a safe boundary."""
        boundaries = self._boundaries(text)
        digests = _prefix_digests(text, boundaries)
        start = self._longest_cached(digests)
        if start is not None:
            index, prefix_tokens = start
            total = self._count_from(text, boundaries, digests, index, prefix_tokens)
            if total is not None:
                return total
        return self._count_whole(text, boundaries, digests)

    def _count_whole(self, text: str, boundaries: list[_Boundary], digests: list[bytes]) -> int:
        enc = self._encode(text)
        self._note(len(text), hit=False)
        self._store(enc, boundaries, digests, 0, 0, 0)
        return len(enc.ids)

    def _count_from(self, text: str, boundaries: list[_Boundary], digests: list[bytes], index: int,
                    prefix_tokens: int) -> int | None:
        """The count with text[:boundaries[index]] cached; None if the suffix disproves the cut."""
        cut = boundaries[index]
        enc = self._encode(text[cut.pos:])
        if not enc.ids or enc.ids[0] != cut.token_id:
            return None  # not the boundary it was taken for: count the whole text instead
        self._note(len(text) - cut.pos, hit=True)
        self._store(enc, boundaries, digests, index + 1, cut.pos, prefix_tokens)
        return prefix_tokens + len(enc.ids)

    def _encode(self, text: str, add_special_tokens: bool = False) -> Any:
        if len(text) < GIL_FREE_CHARS_MIN:
            return self._tok.encode(text, add_special_tokens=add_special_tokens)
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def _boundaries(self, text: str) -> list[_Boundary]:
        if self._added_re is None:
            return []
        return [_Boundary(m.start(), self._safe[m.group()]) for m in self._added_re.finditer(text)
                if m.start() > 0 and m.group() in self._safe]

    def _longest_cached(self, digests: list[bytes]) -> tuple[int, int] | None:
        with self._lock:
            for index in range(len(digests) - 1, -1, -1):
                tokens = self._cache.get(digests[index])
                if tokens is not None:
                    self._cache.move_to_end(digests[index])
                    return index, tokens
        return None

    def _store(self, enc: Any, boundaries: list[_Boundary], digests: list[bytes], first: int, offset: int,
               base_tokens: int) -> None:
        """Cache the count before each kept boundary from `first` on, read off `enc`, the encoding
        of text[offset:] (base_tokens before it), where the boundary token sits at that offset."""
        keep = _kept(boundaries, first, self.stride_chars)
        found: list[tuple[bytes, int]] = []
        for index in keep:
            b = boundaries[index]
            at = enc.char_to_token(b.pos - offset)
            if at is None or enc.ids[at] != b.token_id or enc.offsets[at][0] != b.pos - offset:
                continue  # the tokenizer did not cut here after all: keep no count for it
            found.append((digests[index], base_tokens + at))
        with self._lock:
            for digest, tokens in found:
                self._cache[digest] = tokens
                self._cache.move_to_end(digest)
            while len(self._cache) > self.entries_max:
                self._cache.popitem(last=False)
                self.stats.evictions += 1

    # -- bookkeeping ------------------------------------------------------------------------------

    def _note(self, chars: int, *, hit: bool) -> None:
        with self._lock:
            s = self.stats
            s.counts += 1
            s.hits += hit
            s.misses += not hit
            s.encoded_chars += chars
            s.last_encoded_chars = chars

    def _refuse(self) -> None:
        with self._lock:
            self.stats.refused += 1
        return None


def prompt_chars(gen: GenerationRequest) -> int:
    """The characters of a request's text and tools, cheaply (no JSON encoding): where to count it."""
    if gen.kind == "completion":
        return len(gen.prompt)
    total = 0
    for message in gen.messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
        if message.get("tool_calls"):
            total += INLINE_CHARS_MAX  # unmeasured: send it to a thread
    return total + (INLINE_CHARS_MAX if gen.tools else 0)


def counts_inline(gen: GenerationRequest) -> bool:
    """Cheap enough to count on the event loop."""
    return prompt_chars(gen) < INLINE_CHARS_MAX


def _text_only(messages: list[dict[str, Any]]) -> bool:
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
            return False
    return True


def _prefix_digests(text: str, boundaries: list[_Boundary]) -> list[bytes]:
    """BLAKE2b of text[:b.pos] for every boundary, in one pass over the text."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    digests = []
    last = 0
    for b in boundaries:
        h.update(text[last:b.pos].encode("utf-8"))
        last = b.pos
        digests.append(h.copy().digest())
    return digests


def _kept(boundaries: list[_Boundary], first: int, stride_chars: int) -> list[int]:
    """Indices from `first` on worth caching: one per `stride_chars` (a function of the prefix
    alone, so a resent conversation keeps the same ones) and the last TAIL_BOUNDARIES."""
    kept = []
    tail = len(boundaries) - TAIL_BOUNDARIES
    for index in range(first, len(boundaries)):
        new_stride = index == 0 or boundaries[index].pos // stride_chars != boundaries[index - 1].pos // stride_chars
        if new_stride or index >= tail:
            kept.append(index)
    return kept


class Counters:
    """One ExactCounter per catalogue model that names a tokenizer, built on first use and rebuilt
    when a catalogue reload brings other files. Thread-safe."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._by_model: dict[str, tuple[TokenizerFiles, ExactCounter]] = {}
        self._lock = threading.Lock()

    def get(self, model: str, files: TokenizerFiles | None) -> ExactCounter | None:
        if files is None:
            return None
        with self._lock:
            known = self._by_model.get(model)
            if known is None or known[0] is not files:
                known = (files, ExactCounter(files, **self._kwargs))
                self._by_model[model] = known
            return known[1]
