"""Exact prompt counts: equal to the engine's, within the byte bound, and the prefix cache is exact."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

from common.chat_template import ChatTemplate, TokenizerFiles, special_tokens
from common.openai_schema import chat_request, completion_request
from cortex.budget.estimate import prompt_tokens_bound
from cortex.budget.exact_count import ENTRY_BYTES, INLINE_CHARS_MAX, Counters, ExactCounter, counts_inline
from cortex.fleet.catalogue import CatalogueError, load, parse
from cortex.fleet.kinds import KINDS
from cortex.fleet.registry import model_info
from neuron.app import kernel_spec
from neuron.engines.kernel.checkpoint import CHAT_TEMPLATE, SPECIALS, make_checkpoint, preset_config, tokenizer_config_json
from neuron.engines.kernel.tokenizer import load_tokenizer

PRESET = preset_config("synth-tiny")
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_checkpoint("synth-tiny", str(tmp_path_factory.mktemp("synth-tiny"))))


@pytest.fixture(scope="module")
def engine(checkpoint: Path):
    """The tokenizer as neuron's kernel engine loads it from the same directory."""
    return load_tokenizer(str(checkpoint), config_bos=PRESET.bos_token_id, config_eos=PRESET.eos_token_ids)


@pytest.fixture(scope="module")
def counter(checkpoint: Path) -> ExactCounter:
    return ExactCounter.from_paths(str(checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def advertised(engine):
    """The model as cortex sees it through neuron's /v1/models: the template costs the engine measured."""
    entry = kernel_spec("synth-tiny", 10**7, 100, engine).catalogue_entry(0)
    return model_info(KINDS["neuron"].parse_models({"/v1/models": {"data": [entry]}})["synth-tiny"], 0, 0)


# -- random requests -------------------------------------------------------------------------------

from tests.chat_strategies import _message, _text, _tools  # noqa: E402 (shared with the kernel template tests)


def _conversation(messages: list[dict], system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + messages


# -- exact == engine, exact <= bound -----------------------------------------------------------------


@PROPERTY
@given(st.lists(_message(), min_size=1, max_size=10), _tools, st.one_of(st.none(), _text))
def test_the_exact_count_is_the_engines_and_within_the_byte_bound(counter, engine, advertised, messages, tools, system):
    body = {"model": "synth-tiny", "messages": _conversation(messages, system), **({"tools": tools} if tools else {})}
    gen = chat_request(body)
    exact = counter.count(gen)
    assert exact == len(engine.encode_chat(gen.messages, gen.tools or None))  # neuron's prompt_tokens
    assert exact <= prompt_tokens_bound(gen, advertised)


@PROPERTY
@given(st.lists(st.lists(_message(), min_size=1, max_size=3), min_size=2, max_size=8), _tools, st.one_of(st.none(), _text))
def test_the_prefix_cache_equals_a_fresh_count_over_a_growing_conversation(counter, engine, turns, tools, system):
    conversation = _conversation([], system)
    previous = None
    for turn in turns:
        conversation = conversation + turn
        text = counter.template.render(conversation, tools)
        assert counter.count_chat(conversation, tools) == counter.count_fresh(text) == len(
            engine.encode_chat(conversation, tools))
        if previous is not None:
            # Only what follows the last request's final boundary (its reply primer) was encoded.
            assert counter.stats.last_encoded_chars <= len(text) - len(previous) + len("<|assistant|>")
        previous = text


def test_a_warm_count_encodes_only_the_new_message(counter):
    conversation = [{"role": "system", "content": "s" * 20_000}, {"role": "user", "content": "u" * 20_000}]
    cold = counter.count_chat(conversation)
    hits = counter.stats.hits
    warm = counter.count_chat([*conversation, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "next"}])
    assert counter.stats.hits == hits + 1
    assert counter.stats.last_encoded_chars == len("<|assistant|>ok<|eot_id|><|user|>next<|eot_id|><|assistant|>")
    assert warm == cold + len("ok") + 2 + len("next") + 2  # <|eot_id|><|user|> and <|eot_id|><|assistant|>


# -- tokenizers that are not additive -----------------------------------------------------------------

_CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "Zürich über alles 😀 ",
           "def f(x):\n    return x + 1\n", "{\"type\": \"object\", \"properties\": {}}", "naïve café résumé"] * 20


def _trained(kind: str) -> TokenizerFiles:
    """A BPE with merges (byte-level with its regex split, or Metaspace with prepend 'first'): token
    counts of a string cut anywhere but at a special do not add up."""
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"], initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    config = tokenizer_config_json()
    return TokenizerFiles(tok, config, ChatTemplate(CHAT_TEMPLATE, special_tokens(config)), "", None)


TRAINED = {kind: _trained(kind) for kind in ("bytelevel", "metaspace")}
_words = st.lists(st.sampled_from(["the", " quick", "fox", " hello", "world", "über", " ", "😀", "x", "\n", "ab"]),
                  max_size=30).map("".join)


def test_the_trained_tokenizers_are_not_additive_at_an_arbitrary_cut():
    for files in TRAINED.values():
        counter = ExactCounter(files)
        assert counter.count_fresh("hello world") < counter.count_fresh("hello wo") + counter.count_fresh("rld")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(TRAINED)),
       st.lists(st.lists(st.builds(lambda role, text: {"role": role, "content": text},
                                   st.sampled_from(["system", "user", "assistant", "tool"]), st.one_of(_words, _text)),
                         min_size=1, max_size=3), min_size=2, max_size=6))
def test_the_prefix_cache_is_exact_on_non_additive_tokenizers(kind, turns):
    counter = ExactCounter(TRAINED[kind], stride_chars=16)
    conversation: list[dict] = []
    for turn in turns:
        conversation = conversation + turn
        assert counter.count_chat(conversation) == counter.count_fresh(counter.template.render(conversation))
    assert counter.stats.hits == len(turns) - 1


# -- bounds and threads ----------------------------------------------------------------------------


def test_the_cache_is_bounded_in_bytes_and_stays_exact(checkpoint):
    counter = ExactCounter.from_paths(str(checkpoint / "tokenizer.json"), cache_bytes_max=10 * ENTRY_BYTES,
                                      stride_chars=8)
    conversation: list[dict] = []
    for i in range(40):
        conversation.append({"role": "user" if i % 2 else "assistant", "content": f"message {i} " * 5})
        assert counter.count_chat(conversation) == counter.count_fresh(counter.template.render(conversation))
        assert counter.cache_bytes <= 10 * ENTRY_BYTES
    assert counter.stats.evictions > 0


def test_counts_from_many_threads_at_once_are_exact(checkpoint):
    counter = ExactCounter.from_paths(str(checkpoint / "tokenizer.json"), stride_chars=64)
    base = [{"role": "system", "content": "Ś" * 3000}]
    conversations = [base + [{"role": "user", "content": f"q{j} " * (i + 1)} for j in range(i % 7 + 1)] for i in range(200)]
    start = threading.Barrier(8)

    def run(chunk: list[list[dict]]) -> list[bool]:
        start.wait()
        return [counter.count_chat(c) == counter.count_fresh(counter.template.render(c)) for c in chunk]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, [conversations[i::8] for i in range(8)]))
    assert all(all(r) for r in results)
    assert counter.stats.hits > 0


# -- what cannot be counted -----------------------------------------------------------------------------


def test_an_image_part_a_render_error_or_template_kwargs_give_none(counter):
    image = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]
    assert counter.count_chat(image) is None
    assert counter.count_chat([{"role": "wizard", "content": "x"}]) is None  # the template refuses it
    gen = chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                        "chat_template_kwargs": {"enable_thinking": True}})
    assert counter.count(gen) is None


def test_a_completion_prompt_is_its_tokens(counter, engine):
    gen = completion_request({"model": "m", "prompt": "héllo <|eot_id|>"})
    assert counter.count(gen) == len(engine.encode(gen.prompt, add_special_tokens=True))


def test_counters_rebuild_when_the_catalogue_brings_other_files(checkpoint, tmp_path):
    first = parse({"models": [{"id": "a", "tokenizer": str(checkpoint / "tokenizer.json")}]})
    again = parse({"models": [{"id": "a", "tokenizer": str(checkpoint / "tokenizer.json")}]})
    counters = Counters()
    one = counters.get("a", first.model("a").tokenizer)
    assert one is not None and counters.get("a", first.model("a").tokenizer) is one
    assert counters.get("a", again.model("a").tokenizer) is not one
    assert counters.get("b", None) is None


# -- the catalogue -----------------------------------------------------------------------------------------


def test_the_catalogue_loads_a_tokenizer_relative_to_its_file(checkpoint, tmp_path):
    (tmp_path / "models.toml").write_text(f'[[models]]\nid = "m"\ntokenizer = "{checkpoint.name}/tokenizer.json"\n')
    (tmp_path / checkpoint.name).symlink_to(checkpoint)
    files = load(tmp_path / "models.toml").model("m").tokenizer
    assert files is not None and files.template is not None and files.template.source == CHAT_TEMPLATE
    assert parse({"models": [{"id": "m"}]}).model("m").tokenizer is None


def _tokenizer_dir(tmp_path: Path, checkpoint: Path, name: str, config: str | None = None) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text())
    if config is not None:
        (directory / "tokenizer_config.json").write_text(config)
    return directory


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", r"'models\[0\]\.tokenizer': file not found"),
        ("bad-tokenizer", r"'models\[0\]\.tokenizer': cannot load"),
        ("bad-json", r"'models\[0\]\.tokenizer_config': cannot read"),
        ("not-an-object", r"'models\[0\]\.tokenizer_config': must hold a JSON object"),
        ("no-template", r"'models\[0\]\.tokenizer_config': .* has no 'chat_template'"),
        ("no-config", r"'models\[0\]\.tokenizer_config': no tokenizer_config\.json"),
        ("does-not-compile", r"'models\[0\]\.tokenizer_config': field 'chat_template' does not compile"),
        ("config-missing", r"'models\[0\]\.tokenizer_config': file not found"),
        ("config-alone", r"'models\[0\]\.tokenizer_config' needs 'models\[0\]\.tokenizer'"),
        ("not-a-path", r"'models\[0\]\.tokenizer' must be a file path"),
    ],
)
def test_a_bad_tokenizer_is_refused_at_load_naming_the_key(checkpoint, tmp_path, case, match):
    good = json.dumps(tokenizer_config_json())
    entry: dict = {"id": "m"}
    if case == "missing":
        entry["tokenizer"] = str(tmp_path / "nope" / "tokenizer.json")
    elif case == "bad-tokenizer":
        (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
        entry["tokenizer"] = str(tmp_path / "tokenizer.json")
    elif case == "bad-json":
        entry["tokenizer"] = str(_tokenizer_dir(tmp_path, checkpoint, case, "{oops") / "tokenizer.json")
    elif case == "not-an-object":
        entry["tokenizer"] = str(_tokenizer_dir(tmp_path, checkpoint, case, "[1]") / "tokenizer.json")
    elif case == "no-template":
        entry["tokenizer"] = str(_tokenizer_dir(tmp_path, checkpoint, case, "{}") / "tokenizer.json")
    elif case == "no-config":
        entry["tokenizer"] = str(_tokenizer_dir(tmp_path, checkpoint, case) / "tokenizer.json")
    elif case == "does-not-compile":
        broken = json.dumps(dict(tokenizer_config_json(), chat_template="{% for %}"))
        entry["tokenizer"] = str(_tokenizer_dir(tmp_path, checkpoint, case, broken) / "tokenizer.json")
    elif case == "config-missing":
        entry["tokenizer"] = str(_tokenizer_dir(tmp_path, checkpoint, case, good) / "tokenizer.json")
        entry["tokenizer_config"] = str(tmp_path / "elsewhere.json")
    elif case == "config-alone":
        entry["tokenizer_config"] = str(tmp_path / "tokenizer_config.json")
    elif case == "not-a-path":
        entry["tokenizer"] = 7
    with pytest.raises(CatalogueError, match=match):
        parse({"models": [entry]})


def test_an_explicit_tokenizer_config_is_used(checkpoint, tmp_path):
    directory = _tokenizer_dir(tmp_path, checkpoint, "split")
    other = tmp_path / "template.json"
    other.write_text(json.dumps(dict(tokenizer_config_json(), chat_template="{{ bos_token }}{{ messages | length }}")))
    files = parse({"models": [{"id": "m", "tokenizer": str(directory / "tokenizer.json"),
                               "tokenizer_config": str(other)}]}).model("m").tokenizer
    assert ExactCounter(files).count_chat([{"role": "user", "content": "x"}]) == 2  # bos and "1"


def test_small_prompts_count_on_the_event_loop_and_large_ones_in_a_thread():
    def gen(text: str, **extra) -> object:
        return chat_request({"model": "m", "messages": [{"role": "user", "content": text}], **extra})

    assert counts_inline(gen("hi"))
    assert not counts_inline(gen("x" * INLINE_CHARS_MAX))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert not counts_inline(gen("hi", tools=tools))
