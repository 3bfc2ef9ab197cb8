#!/usr/bin/env python3
"""Benchmark exact prompt counting (cortex/budget/exact_count.py) on a Claude Code-shaped request.

The request is built synthetically to the shape of a measured Claude Code
2.1.328 one (issue 14): about 48 KB of JSON, a 3-block system prompt, 12
tools with JSON schemas, and a multi-turn conversation with tool calls and
tool results. It is counted

* cold: an empty prefix cache (render, hash, encode everything);
* warm: the cache holds the conversation, and the request is the same
  conversation plus one new user message (what an agent sends next);
* render only: the jinja render alone, the part of a warm count that still
  grows with the whole prompt;

against the baseline in the same run, cortex's byte bound
(`prompt_tokens_bound` with the template costs the engine advertises).
Medians over repeats; prints a markdown table.

Tokenizers: the shipped synth-tiny one (byte-level, so exact ~ bytes), a
byte-level BPE with merges trained here on a small synthetic English, code
and JSON corpus (its token ratio is illustrative only; the timing is the
point), and any `--tokenizer DIR/tokenizer.json` given (a real model's).

    python scripts/bench_exact_count.py
    python scripts/bench_exact_count.py --repeats 31 --tokenizer ~/models/Qwen2.5-7B/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from common.chat_template import ChatTemplate, TokenizerFiles, load_files, special_tokens  # noqa: E402
from common.openai_schema import chat_request  # noqa: E402
from cortex.budget.estimate import prompt_tokens_bound  # noqa: E402
from cortex.budget.exact_count import ExactCounter  # noqa: E402
from cortex.fleet.kinds import KINDS  # noqa: E402
from cortex.fleet.registry import ModelInfo, model_info  # noqa: E402
from neuron.app import kernel_spec  # noqa: E402
from neuron.engines.kernel.checkpoint import CHAT_TEMPLATE, SPECIALS, tokenizer_config_json  # noqa: E402
from neuron.engines.kernel.tokenizer import KernelTokenizer  # noqa: E402

WORDS = ("the file function return value error test build agent tool call read write edit search result "
         "context budget token model request user assistant system prompt schema object string array "
         "number boolean description required properties path line command output input").split()
TOOLS = ("Bash", "Read", "Write", "Edit", "Glob", "Grep", "WebFetch", "WebSearch", "TodoWrite", "Task",
         "NotebookEdit", "ExitPlanMode")


def prose(rng: random.Random, words: int) -> str:
    out = []
    for i in range(words):
        out.append(rng.choice(WORDS))
        if i % 14 == 13:
            out.append(rng.choice((".\n", ". ", ", ", ":\n- ")))
    return " ".join(out)


def code(rng: random.Random, lines: int) -> str:
    return "\n".join(f"    {rng.choice(WORDS)}_{i} = {rng.choice(WORDS)}({rng.randint(0, 999)}, '{rng.choice(WORDS)}')"
                     for i in range(lines))


def tool(rng: random.Random, name: str) -> dict[str, Any]:
    props = {f"{rng.choice(WORDS)}_{i}": {"type": rng.choice(("string", "integer", "boolean")),
                                          "description": prose(rng, rng.randint(8, 30))} for i in range(rng.randint(2, 6))}
    return {"type": "function", "function": {
        "name": name, "description": prose(rng, rng.randint(60, 200)),
        "parameters": {"type": "object", "properties": props, "required": sorted(props)[:2],
                       "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}}


def claude_code_request(seed: int = 1, turns: int = 7) -> dict[str, Any]:
    """~48 KB of JSON: 3 system blocks, 12 tools, `turns` rounds of user / tool call / tool result / reply."""
    rng = random.Random(seed)
    system = [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
              {"type": "text", "text": prose(rng, 1500)},
              {"type": "text", "text": "<env>\nWorking directory: /home/dev/project\nPlatform: linux\n</env>\n" + prose(rng, 250)}]
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for t in range(turns):
        messages.append({"role": "user", "content": prose(rng, rng.randint(15, 60))})
        call = {"id": f"toolu_{t:02d}", "type": "function",
                "function": {"name": rng.choice(TOOLS), "arguments": json.dumps({"path": f"src/{rng.choice(WORDS)}.py"})}}
        messages.append({"role": "assistant", "content": prose(rng, 20), "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": code(rng, rng.randint(10, 30))})
        messages.append({"role": "assistant", "content": prose(rng, rng.randint(30, 90))})
    return {"model": "m", "max_tokens": 32000, "stream": True, "messages": messages,
            "tools": [tool(rng, name) for name in TOOLS]}


def trained_bpe() -> TokenizerFiles:
    rng = random.Random(7)
    corpus = [prose(rng, 200) for _ in range(200)] + [code(rng, 40) for _ in range(100)]
    corpus += [json.dumps(tool(rng, n)) for n in TOOLS * 5]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=8000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    config = tokenizer_config_json()
    return TokenizerFiles(tok, config, ChatTemplate(CHAT_TEMPLATE, special_tokens(config)), "", None)


def shipped() -> TokenizerFiles:
    from neuron.engines.kernel.checkpoint import build_byte_level_tokenizer  # noqa: PLC0415

    directory = tempfile.mkdtemp(prefix="bench-exact-")
    build_byte_level_tokenizer(SPECIALS).save(f"{directory}/tokenizer.json")
    Path(directory, "tokenizer_config.json").write_text(json.dumps(tokenizer_config_json()))
    return load_files(f"{directory}/tokenizer.json")


def advertised(files: TokenizerFiles) -> ModelInfo:
    """The template costs neuron would advertise for these files (its KernelTokenizer measures them)."""
    assert files.template is not None
    kt = KernelTokenizer(files.tokenizer, files.config, chat_template=files.template.source)
    entry = kernel_spec("m", 10**7, 32000, kt).catalogue_entry(0)
    return model_info(KINDS["neuron"].parse_models({"/v1/models": {"data": [entry]}})["m"], 0, 0)


def median_us(fn: Callable[[int], Any], repeats: int, setup: Callable[[int], Any] = lambda i: None) -> float:
    times = []
    for i in range(repeats):
        setup(i)
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def fmt(us: float) -> str:
    return f"{us:,.0f} µs" if us < 10_000 else f"{us / 1000:,.1f} ms"


def bench(label: str, files: TokenizerFiles, body: dict[str, Any], repeats: int) -> list[str]:
    counter = ExactCounter(files)
    info = advertised(files)
    gen = chat_request(body)
    nexts = [chat_request({**body, "messages": [*body["messages"], {"role": "user", "content": f"Now run test {i} please."}]})
             for i in range(repeats)]
    assert files.template is not None
    bound = prompt_tokens_bound(gen, info)
    exact = counter.count(gen)
    assert exact is not None and exact == counter.count_fresh(files.template.render(gen.messages, gen.tools))
    exact_next = counter.count(nexts[0])
    assert exact_next == counter.count_fresh(files.template.render(nexts[0].messages, nexts[0].tools))
    bound_us = median_us(lambda i: prompt_tokens_bound(gen, info), repeats)
    cold_us = median_us(lambda i: counter.count(gen), repeats, setup=lambda i: counter.clear())

    def warm_up(i: int) -> None:
        counter.clear()
        counter.count(gen)

    warm_us = median_us(lambda i: counter.count(nexts[i]), repeats, setup=warm_up)
    warm_chars = counter.stats.last_encoded_chars
    render_us = median_us(lambda i: files.template.render(nexts[i].messages, nexts[i].tools), repeats)  # type: ignore[union-attr]
    ratio = f"{exact / bound:.2f}"
    return [
        f"| {label} | byte bound (baseline) | {fmt(bound_us)} | — | {bound:,} | 1.00 |",
        f"| {label} | exact, cold | {fmt(cold_us)} | {exact:,} | {bound:,} | {ratio} |",
        f"| {label} | exact, warm (+1 user message; {warm_chars} chars encoded) | {fmt(warm_us)} | {exact_next:,} | "
        f"{prompt_tokens_bound(nexts[0], info):,} | {exact_next / prompt_tokens_bound(nexts[0], info):.2f} |",
        f"| {label} | render only (in warm) | {fmt(render_us)} | — | — | — |",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--tokenizer", action="append", default=[], help="a tokenizer.json (its tokenizer_config.json beside it)")
    args = ap.parse_args(argv)
    body = claude_code_request()
    size = len(json.dumps(body).encode())
    tokenizers = [("synth-tiny (shipped, byte-level)", shipped()), ("trained BPE, 8k vocab", trained_bpe())]
    tokenizers += [(path, load_files(path)) for path in args.tokenizer]
    print(f"Request: {size:,} bytes of JSON, {len(body['messages'])} messages (3 system blocks), "
          f"{len(body['tools'])} tools; medians of {args.repeats}.\n")
    print("| tokenizer | count | per count | exact tokens | byte bound | exact / bound |")
    print("|---|---|---|---|---|---|")
    for label, files in tokenizers:
        for row in bench(label, files, body, args.repeats):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
