"""The kernel engine as neuron serves it: a ModelRunner and a Sampler per request,
turned into generations.

The pure parts come first: incremental detokenisation that never splits a
UTF-8 character, stop sequences held back until they cannot match, and a
sequence's finish (EOS, stop, max_tokens). Then loading: a load request
becomes a `LoadSpec`, is estimated cheaply (weights plus the KV budget)
before anything is allocated, and is loaded and warmed up in a thread.

Output text never holds more UTF-8 bytes than the tokens that made it,
for a byte-level tokenizer: cortex's relay counts one token per byte for
a neuron, so a U+FFFD (three bytes) for one invalid byte would be an
overcharge. Invalid bytes are therefore dropped, not replaced, and
special tokens (role markers) write nothing.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from common import errors
from common.openai_schema import GenerationRequest
from neuron.admission import AdmissionLimits, kv_budget_tokens
from neuron.lifecycle import Requests, check_name
from neuron.scheduler import DEFAULT_PREFILL_BUDGET_TOKENS, Scheduler

PRESET_NAMES = ("synth-tiny", "synth-small")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "numpy", "numba", "cupy")
WARMUP_SEQ_ID = -1  # never a request's: the scheduler numbers from 0
ENCODE_IN_THREAD_CHARS = 16 * 1024  # a longer prompt is tokenised off the event loop
TOP_K_MAX = 1 << 20


# --- detokenisation ------------------------------------------------------------------------


def byte_table(tokenizer: Any) -> dict[int, int] | None:
    """token id -> the byte it stands for, for a byte-level tokenizer; None otherwise.

    Found by encoding a probe holding every byte valid UTF-8 can contain;
    the tokens of the rest (0xC0, 0xC1, 0xF5-0xFF) by decoding each alone.
    """
    if tokenizer.kind != "byte-level":
        return None
    leads = [bytes([b, 0x80]) for b in range(0xC2, 0xE0)]
    leads += [bytes([0xE0, 0xA0, 0x80])] + [bytes([b, 0x80, 0x80]) for b in range(0xE1, 0xF0)]
    leads += [bytes([0xF0, 0x90, 0x80, 0x80])] + [bytes([b, 0x80, 0x80, 0x80]) for b in range(0xF1, 0xF5)]
    conts = [bytes([0xC2, b]) for b in range(0x80, 0xC0)]
    probe = bytes(range(1, 0x80)) + b"".join(leads) + b"".join(conts)  # NUL too, below
    probe = b"\x00" + probe
    ids = tokenizer.encode(probe.decode("utf-8"), add_special_tokens=False)
    if len(ids) != len(probe):
        return None
    table: dict[int, int] = {}
    for token, byte in zip(ids, probe):
        if table.setdefault(token, byte) != byte:
            return None
    # The bytes no valid text holds still have tokens (the model may write them): they decode alone to
    # U+FFFD, where a special decodes to nothing. Every one of them ends a pending character as invalid
    # and is invalid itself, so 0xFF stands for them all.
    for token in range(tokenizer.vocab_size):
        if token not in table and tokenizer.decode([token]) == "\ufffd":
            table[token] = 0xFF
    return table


class ByteDetokenizer:
    """Bytes in, text out: characters whole, invalid bytes dropped, never more bytes than tokens."""

    def __init__(self, table: dict[int, int]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.tokens = 0
        self.text_bytes = 0

    def feed(self, token: int) -> str:
        self.tokens += 1
        byte = self._table.get(token)
        text = "" if byte is None else self._utf8.decode(bytes([byte]))
        return self._count(text)

    def flush(self) -> str:
        return self._count(self._utf8.decode(b"", final=True))  # an incomplete tail is dropped

    def _count(self, text: str) -> str:
        self.text_bytes += len(text.encode())
        assert self.text_bytes <= self.tokens
        return text


class TextDetokenizer:
    """Any tokenizer: decode a sliding window and emit only what no later token can change.

    Text is held while the window's decode ends in U+FFFD (an incomplete
    character), for at most MAX_HELD tokens; past that the bytes were
    invalid and the replacement character is emitted as it stands.
    """

    MAX_HELD = 4  # tokens: the longest UTF-8 character, at one byte per token

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here, for context (a leading space, a merge)
        self._read = 0  # everything before this is emitted

    def feed(self, token: int) -> str:
        self._ids.append(token)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        now = self._tok.decode(self._ids[self._prefix :])
        if len(now) <= len(before) or (now.endswith("\ufffd") and len(self._ids) - self._read < self.MAX_HELD):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before) :]

    def flush(self) -> str:
        before = self._tok.decode(self._ids[self._prefix : self._read])
        now = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return now[len(before) :].rstrip("\ufffd")  # an incomplete tail is dropped


class StopText:
    """Holds back the last (longest stop - 1) characters until they cannot start a stop sequence.

    The first stop sequence to complete ends the text, cut where it starts (as vLLM does):
    a server that streams cannot wait to see whether a longer one would have started earlier."""

    def __init__(self, stops: list[str]) -> None:
        assert all(stops)
        self.stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text now safe to emit, whether a stop sequence was found: nothing after it is emitted)."""
        self._pending += text
        found = [(i + len(s), i) for s, i in ((s, self._pending.find(s)) for s in self.stops) if i >= 0]
        if found:  # the match that completes first wins, as it would have token by token
            _, cut = min(found)
            out, self._pending = self._pending[:cut], ""
            return out, True
        keep = len(self._pending) - self._hold
        if keep <= 0:
            return "", False
        out, self._pending = self._pending[:keep], self._pending[keep:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class SequenceOutput:
    """One sequence's tokens -> its text and finish: EOS and stop give `stop`; the scheduler
    ends it at max_tokens (`length`) and calls `flush`."""

    def __init__(self, detokenizer: ByteDetokenizer | TextDetokenizer, eos_token_ids: frozenset[int],
                 stops: list[str]) -> None:
        self._detok = detokenizer
        self._eos = eos_token_ids
        self._stop = StopText(stops)
        self.finished = False

    def feed(self, token: int) -> tuple[str, str | None]:
        assert not self.finished
        if token in self._eos:
            self.finished = True
            return self._tail(), "stop"
        text, stopped = self._stop.feed(self._detok.feed(token))
        if stopped:
            self.finished = True
            return text, "stop"
        return text, None

    def flush(self) -> str:
        self.finished = True
        return self._tail()

    def _tail(self) -> str:
        text, stopped = self._stop.feed(self._detok.flush())
        return text if stopped else text + self._stop.flush()


# --- request fields ------------------------------------------------------------------------


def sampling_fields(gen: GenerationRequest) -> dict[str, Any]:
    """temperature (OpenAI's default 1; 0 is greedy), top_p, top_k (an extra field; 0 or -1: off), seed.

    temperature, top_p and seed are validated by common.openai_schema; top_k here."""
    body = gen.body
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not -1 <= top_k <= TOP_K_MAX):
        raise errors.invalid_request(f"'top_k' must be an integer from -1 (off) to {TOP_K_MAX}.", param="top_k")
    fields: dict[str, Any] = {
        "temperature": 1.0 if temperature is None else float(temperature),
        "top_p": 1.0 if top_p is None else float(top_p),
        "top_k": 0 if top_k in (None, -1) else top_k,
        "seed": body.get("seed"),
    }
    if fields["top_p"] == 0:  # the mass of no token: only the most likely one is left
        fields["top_p"], fields["top_k"] = 1.0, 1
    return fields


# --- loading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelEngine:
    """neuron serve's kernel flags; each applies to every model this neuron loads."""

    name = "kernel"
    backend: str = "auto"
    device: str = "auto"
    max_in_flight: int = 64
    max_queue_depth: int = 256
    queue_wait_s: float = 30.0
    kv_budget_mb: float = 512.0
    prefill_budget_tokens: int = DEFAULT_PREFILL_BUDGET_TOKENS
    output_tokens: int = 4096  # limit.output, capped at the model's context
    seed: int = 0  # mixed into the sampling seed of requests that bring none

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.kv_budget_mb * 2**20)


@dataclass(frozen=True)
class LoadSpec:
    name: str
    preset: str | None = None
    path: str | None = None
    device: str = "auto"
    backend: str = "auto"


def load_spec(body: dict[str, Any], settings: KernelEngine) -> LoadSpec:
    """A POST /models/load body -> what to load. Without `path` or `preset`, `model` names a preset."""
    name = check_name(body.get("model"))
    for key in ("path", "preset", "device", "backend"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise errors.invalid_request(f"'{key}' must be a string.", param=key)
    path, preset = body.get("path"), body.get("preset")
    if path is not None and ("\x00" in path or not path.strip()):
        raise errors.invalid_request("'path' must be a checkpoint directory's path (not empty, no NUL).", param="path")
    if path is not None and preset is not None:
        raise errors.invalid_request("Give 'path' or 'preset', not both.", param="path")
    if path is None and preset is None:
        preset = name
    if preset is not None and preset not in PRESET_NAMES:
        raise errors.invalid_request(
            f"Unknown preset {preset!r}; known: {', '.join(PRESET_NAMES)} (or give a checkpoint 'path').",
            param="preset",
        )
    device = body.get("device") or settings.device
    backend = body.get("backend") or settings.backend
    if device not in DEVICES:
        raise errors.invalid_request(f"'device' must be one of {', '.join(DEVICES)}.", param="device")
    if backend not in BACKENDS:
        raise errors.invalid_request(f"'backend' must be one of {', '.join(BACKENDS)}.", param="backend")
    return LoadSpec(name, preset, path, device, backend)


@dataclass
class KernelModel:
    """A loaded kernel model: its runner, its batch, and what requests need of its tokenizer."""

    spec: Any  # neuron.app.ModelSpec
    runner: Any  # neuron.engines.kernel.runner.ModelRunner
    scheduler: Scheduler
    memory_bytes: int
    settings: KernelEngine
    table: dict[int, int] | None
    requests: Requests = field(default_factory=Requests)
    _seeds: int = 0

    @property
    def tokenizer(self) -> Any:
        return self.runner.tokenizer

    def output(self, stops: list[str]) -> SequenceOutput:
        detok = ByteDetokenizer(self.table) if self.table is not None else TextDetokenizer(self.tokenizer)
        return SequenceOutput(detok, self.tokenizer.eos_token_ids, stops)

    def fallback_seed(self) -> int:
        """A request without a seed: distinct per request, reproducible per process (`--seed`)."""
        self._seeds += 1
        return (self.settings.seed << 32) ^ self._seeds

    def encode_sync(self, gen: GenerationRequest) -> list[int]:
        """The prompt's ids; refusals as 400s. Chat: the model's template, with `tools` rendered in,
        and nothing else of the body (no `chat_template_kwargs`): cortex counts the prompt exactly
        with the advertised files on that understanding."""
        from neuron.engines.kernel.runner import ChatTemplateError  # noqa: PLC0415 - the engine's own error

        tok = self.tokenizer
        try:
            if gen.kind == "chat":
                return tok.encode_chat(gen.messages, gen.tools or None)
            ids = tok.encode(gen.prompt, add_special_tokens=True)
        except ChatTemplateError as exc:
            raise errors.invalid_request(f"The model's chat template refused these messages: {exc}",
                                         param="messages") from None
        if not ids and tok.bos_token_id is not None:
            ids = [tok.bos_token_id]
        if not ids:
            raise errors.invalid_request("'prompt' must not be empty for this model.", param="prompt")
        return ids


def estimate_bytes(spec: LoadSpec, settings: KernelEngine) -> int:
    """What a load will take, before allocating: the weights on the device plus the KV budget."""
    from neuron.engines.kernel.runner import estimate_weight_bytes  # noqa: PLC0415 - numpy and friends, when used

    return estimate_weight_bytes(preset=spec.preset, path=spec.path, device=spec.device) + settings.kv_budget_bytes


_load_lock = threading.Lock()  # one load allocating at a time: two would race for the same memory


def load_sync(spec: LoadSpec, settings: KernelEngine, make_spec: Any) -> KernelModel:
    """In a thread: load the runner, warm it up with one two-token step (numba compiles here), build its batch.

    `make_spec(name, context_tokens, output_tokens, tokenizer)` makes the catalogue entry."""
    from neuron.engines.kernel.runner import StepInput, load_runner  # noqa: PLC0415

    with _load_lock:
        runner = load_runner(preset=spec.preset, path=spec.path, served_name=spec.name, backend=spec.backend,
                             device=spec.device)
        try:
            # Two tokens: a step of several rows takes numba's small-batch projection, which a
            # single token (a gemv, left to BLAS) would leave to compile on the first real batch.
            bos = runner.tokenizer.bos_token_id if runner.tokenizer.bos_token_id is not None else 0
            warm = [bos] * min(2, runner.context_tokens)
            runner.step([StepInput(WARMUP_SEQ_ID, warm)])
            runner.free(WARMUP_SEQ_ID)
            assert runner.kv_tokens_used() == 0
            table = byte_table(runner.tokenizer)
        except BaseException:
            runner.close()
            raise
    limits = AdmissionLimits(
        max_in_flight=settings.max_in_flight,
        max_queue_depth=settings.max_queue_depth,
        queue_wait_s=settings.queue_wait_s,
        kv_budget_tokens=max(1, kv_budget_tokens(settings.kv_budget_bytes, runner.kv_bytes_per_token)),
    )
    scheduler = Scheduler(spec.name, runner, limits, prefill_budget_tokens=settings.prefill_budget_tokens,
                          step_input=StepInput)
    catalogue = make_spec(spec.name, runner.context_tokens, min(settings.output_tokens, runner.context_tokens),
                          runner.tokenizer)
    return KernelModel(catalogue, runner, scheduler, runner.weight_bytes + settings.kv_budget_bytes, settings, table)


def host_memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) bytes of host memory, from /proc/meminfo or sysconf."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info.get("MemTotal"), info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None, None


def device_memory_bytes(device: str) -> int:
    """The default memory budget: the first GPU's memory on cuda, else the host's."""
    from neuron.engines.kernel.runner import cuda_available  # noqa: PLC0415

    if device == "cuda" or (device == "auto" and cuda_available()):
        found = gpus()
        if found:
            return found[0]["memory_total_bytes"]
    total, _ = host_memory_bytes()
    return total or 0


def cupy_installed() -> bool:
    return importlib.util.find_spec("cupy") is not None


def gpus() -> list[dict[str, Any]]:
    """Each CUDA device cupy sees: name, memory total and free, compute capability. [] without cupy."""
    try:
        import cupy  # noqa: PLC0415 - optional (the [gpu] extra), and slow to import

        if not cupy.cuda.is_available():
            return []
        out = []
        for index in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(index)
            with cupy.cuda.Device(index) as device:
                free, total = device.mem_info
                capability = device.compute_capability
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            out.append({"kind": "cuda", "index": index, "name": name, "memory_total_bytes": int(total),
                        "memory_free_bytes": int(free), "compute_capability": f"{capability[:-1]}.{capability[-1]}"})
        return out
    except Exception:  # ImportError, or a driver that fails: no GPUs to report
        return []
