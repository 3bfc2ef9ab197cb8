"""neuron's kernel engine advertises its tokenizer files; cortex fetches them once per sha256 and
counts prompts exactly with them.

Pure pieces first (the document and its loader, the advert parser, the fleet's agreement and the
fetch store), then the poller's fetch against a stand-in upstream, then neuron serving the document.
The real processes end to end: tests/test_kernel_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from common.chat_template import (
    LIMIT_DOCUMENT_BYTES,
    TokenizerFilesError,
    document_sha256,
    files_from_document,
    files_from_strings,
    load_files,
    tokenizer_document,
)
from common.openai_schema import chat_request, completion_request
from cortex.budget.exact_count import ExactCounter
from cortex.config import Config
from cortex.fleet import tokenizers
from cortex.fleet.catalogue import parse as parse_catalogue
from cortex.fleet.health import counter_from_document, fetch_tokenizer, start_tokenizer_fetches
from cortex.fleet.kinds import KINDS
from cortex.fleet.registry import Fleet, ModelInfo, model_info
from cortex.fleet.tokenizers import TokenizerStore
from cortex.fleet.upstream import UpstreamFailed
from cortex.proxy import Proxy
from neuron.app import ModelSpec, NeuronConfig, kernel_spec, tokenizer_path
from neuron.engines.kernel.checkpoint import make_checkpoint, preset_config, preset_tokenizer
from neuron.engines.kernel.tokenizer import load_tokenizer
from tests.kernel_helpers import HI, load_tiny, served

MODEL = "synth-tiny"
TOKENIZER = preset_tokenizer(preset_config(MODEL))
DOCUMENT = TOKENIZER.files_document()
SHA = document_sha256(DOCUMENT)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three primes, über alles 😀"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_checkpoint(MODEL, str(tmp_path_factory.mktemp("advert") / MODEL)))


# --- the document and its loader --------------------------------------------------------------


def test_a_document_loads_to_the_same_counts_as_the_files_on_disk(checkpoint):
    from_disk = ExactCounter(load_files(str(checkpoint / "tokenizer.json")))
    from_bytes = ExactCounter(files_from_document(DOCUMENT))
    chat = chat_request({"model": MODEL, "messages": MESSAGES})
    legacy = completion_request({"model": MODEL, "prompt": "Once upon"})
    assert from_bytes.count(chat) == from_disk.count(chat) == len(TOKENIZER.encode_chat(MESSAGES))
    assert from_bytes.count(legacy) == from_disk.count(legacy) == len(TOKENIZER.encode("Once upon", add_special_tokens=True))


def test_the_document_carries_the_template_the_engine_renders_even_from_a_jinja_file(checkpoint, tmp_path):
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (tmp_path / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(template)
    engine = load_tokenizer(str(tmp_path), config_bos=None, config_eos=())
    files = files_from_document(engine.files_document())
    assert files.template is not None and files.template.source == template
    assert ExactCounter(files).count_chat(MESSAGES) == len(engine.encode_chat(MESSAGES))


def test_files_from_strings_takes_no_config_and_refuses_what_load_files_refuses():
    text = json.loads(DOCUMENT)["tokenizer_json"]
    bare = files_from_strings(text)
    assert bare.template is None and bare.config == {}
    with pytest.raises(TokenizerFilesError, match="tokenizer.json: cannot load"):
        files_from_strings("{not json")
    with pytest.raises(TokenizerFilesError, match="tokenizer_config.json: must hold a JSON object"):
        files_from_strings(text, ["a list"])  # type: ignore[arg-type]
    with pytest.raises(TokenizerFilesError, match="'chat_template' does not compile"):
        files_from_strings(text, {"chat_template": "{% for %}"})
    with pytest.raises(TokenizerFilesError, match="'chat_template' must be a string"):
        files_from_strings(text, {"chat_template": 7})


@pytest.mark.parametrize("raw, says", [
    (b"\xff", "not a JSON document"),
    (b"[]", "must hold a JSON object"),
    (b'{"tokenizer_config": {}}', "'tokenizer_json' must be tokenizer.json's text"),
    (b'{"tokenizer_json": "{}", "tokenizer_config": "x"}', "'tokenizer_config' must be tokenizer_config.json's object"),
    (b'{"tokenizer_json": "{}", "tokenizer_config": {}}', "tokenizer_json: cannot load"),
    (b" " * (LIMIT_DOCUMENT_BYTES + 1), "over"),
], ids=["not-utf8", "not-object", "no-tokenizer", "config-not-object", "bad-tokenizer", "too-large"])
def test_a_malformed_document_is_refused_with_what_is_wrong(raw, says):
    with pytest.raises(TokenizerFilesError, match=says):
        files_from_document(raw, what="GET /t")


def test_the_document_is_compact_utf8_and_its_sha256_is_of_the_bytes_served():
    body = json.loads(DOCUMENT)
    assert set(body) == {"tokenizer_json", "tokenizer_config"}
    assert tokenizer_document(body["tokenizer_json"], body["tokenizer_config"]) == DOCUMENT
    assert len(SHA) == 64 and SHA == document_sha256(DOCUMENT) != document_sha256(DOCUMENT + b" ")


# --- neuron's advert ----------------------------------------------------------------------------


def test_a_kernel_model_advertises_its_document_and_the_mock_nothing():
    entry = kernel_spec(MODEL, 2048, 2048, TOKENIZER).catalogue_entry(0)["tokenizer"]
    assert entry["sha256"] == SHA and entry["url"] == f"/v1/models/{MODEL}/tokenizer"
    assert entry["kind"] == "byte-level" and entry["message_overhead_tokens"] == TOKENIZER.message_overhead_tokens
    assert "sha256" not in ModelSpec("cortex-mock").catalogue_entry(0)["tokenizer"]
    assert tokenizer_path("org/model v2") == "/v1/models/org%2Fmodel%20v2/tokenizer"


async def test_neuron_serves_the_document_a_kernel_model_advertises_and_404s_otherwise():
    model = load_tiny(name="org/tiny")
    async with served(NeuronConfig(engine=model.settings, preloaded=[model])) as (_, url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            advert = (await client.get("/v1/models")).json()["data"][0]["tokenizer"]
            got = await client.get(advert["url"])
            assert got.status_code == 200 and got.headers["etag"] == f'"{advert["sha256"]}"'
            assert document_sha256(got.content) == advert["sha256"] == SHA and got.content == DOCUMENT
            missing = await client.get("/v1/models/nope/tokenizer")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
            assert (await client.get("/v1/models/org%2Ftiny")).status_code == 404
            assert (await client.post(advert["url"])).status_code == 405
    async with served(NeuronConfig()) as (_, url):  # the mock
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            entry = (await client.get("/v1/models")).json()["data"][0]
            assert "sha256" not in entry["tokenizer"] and "url" not in entry["tokenizer"]
            none = await client.get(tokenizer_path(entry["id"]))
            assert none.status_code == 404 and none.json()["error"]["code"] == "tokenizer_not_found"


# --- cortex reads the advert ----------------------------------------------------------------------


def _listing(**tokenizer: Any) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": "m", "limit": {"context": 2048, "output": 512},
                                        "tokenizer": {"kind": "byte-level", **tokenizer}}]}


def test_the_neuron_kind_reads_the_advert_and_none_is_no_advert():
    parse = KINDS["neuron"].parse_models
    entry = parse({"/v1/models": _listing(sha256=SHA, url="/v1/models/m/tokenizer")})["m"]
    assert (entry.tokenizer_sha256, entry.tokenizer_path) == (SHA, "/v1/models/m/tokenizer")
    info = model_info(entry, 8192, 4096)
    assert (info.tokenizer_sha256, info.tokenizer_path) == (SHA, "/v1/models/m/tokenizer")
    bare = parse({"/v1/models": _listing()})["m"]
    assert bare.tokenizer_sha256 is None and bare.tokenizer_path is None


@pytest.mark.parametrize("advert, says", [
    ({"sha256": SHA}, "tokenizer.url"),
    ({"url": "/t"}, "tokenizer.sha256"),
    ({"sha256": SHA.upper(), "url": "/t"}, "tokenizer.sha256"),
    ({"sha256": SHA[:63], "url": "/t"}, "tokenizer.sha256"),
    ({"sha256": SHA, "url": "http://elsewhere/t"}, "tokenizer.url"),
    ({"sha256": SHA, "url": "//elsewhere/t"}, "tokenizer.url"),
    ({"sha256": SHA, "url": "/a b"}, "tokenizer.url"),
    ({"sha256": SHA, "url": "/" + "a" * 4096}, "tokenizer.url"),
], ids=["no-url", "no-sha", "upper", "short", "absolute", "scheme-relative", "space", "long"])
def test_a_malformed_advert_makes_the_model_list_malformed(advert, says):
    with pytest.raises(ValueError, match=says):
        KINDS["neuron"].parse_models({"/v1/models": _listing(**advert)})


# --- the fleet's agreement ------------------------------------------------------------------------------


def _info(sha: str | None, name: str = "m") -> dict[str, ModelInfo]:
    return {name: ModelInfo(name, 2048, 512, message_overhead_tokens=3, reply_primer_tokens=3, template_exact=False,
                            tokenizer_sha256=sha, tokenizer_path=f"/v1/models/{name}/tokenizer" if sha else None)}


OTHER = "0" * 64


def test_a_model_counts_exactly_only_when_every_healthy_node_advertises_one_held_sha256():
    fleet = Fleet(["http://a", "http://b", "http://c"])
    fleet.poll_succeeded("http://a", _info(SHA))
    fleet.poll_succeeded("http://b", _info(SHA))
    assert fleet.tokenizer_sha256("m") == SHA and fleet.exact_counter("m") is None  # advertised, not held yet
    assert not fleet.model_info("m").bound_exact  # an advertised template: only upper bounds
    assert fleet.tokenizer_sources() == {SHA: [("http://a", "/v1/models/m/tokenizer"), ("http://b", "/v1/models/m/tokenizer")]}
    counter = object()
    assert fleet.tokenizers.due([SHA], 0.0) == [SHA]
    fleet.tokenizers.fetched(SHA, counter)
    assert fleet.exact_counter("m") is counter and fleet.model_info("m").bound_exact
    assert fleet.model_info("m").tokenizer_sha256 == SHA
    assert fleet.status()["tokenizers"] == {"m": {"sha256": SHA, "state": "held"}}
    fleet.poll_succeeded("http://c", _info(OTHER))  # a replica with other files: no exact count
    assert fleet.tokenizer_sha256("m") is None and fleet.exact_counter("m") is None
    assert not fleet.model_info("m").bound_exact
    assert fleet.tokenizer_conflicts() == {"m": tuple(sorted((SHA, OTHER)))}
    assert fleet.status()["tokenizers"]["m"] == {"sha256": None, "state": "disagree"}
    fleet.dispatch_failed("http://c", "refused")  # an unhealthy replica does not count
    assert fleet.exact_counter("m") is counter and fleet.tokenizer_conflicts() == {}
    assert fleet.tokenizer_sources() == {SHA: [("http://a", "/v1/models/m/tokenizer"), ("http://b", "/v1/models/m/tokenizer")]}


def test_a_replica_that_advertises_no_tokenizer_keeps_the_byte_bound():
    fleet = Fleet(["http://a", "http://b"])
    fleet.poll_succeeded("http://a", _info(SHA))
    fleet.poll_succeeded("http://b", _info(None))
    fleet.tokenizers.due([SHA], 0.0)
    fleet.tokenizers.fetched(SHA, object())
    assert fleet.exact_counter("m") is None and fleet.tokenizer_conflicts() == {"m": (None, SHA)}


# --- the fetch store ------------------------------------------------------------------------------------


def test_each_sha256_is_fetched_once_and_a_failure_backs_off_doubling():
    store = TokenizerStore(fetches_at_once=1)
    assert store.due([SHA, OTHER], 0.0) == [OTHER]  # one at a time
    assert store.due([SHA, OTHER], 0.0) == []
    store.fetched(OTHER, "counter")
    assert store.due([SHA, OTHER], 0.0) == [SHA]
    assert store.fetch_failed(SHA, "boom", 10.0) == tokenizers.RETRY_S_MIN
    assert store.state(SHA) == "failed" and store.last_error(SHA) == "boom"
    assert store.due([SHA, OTHER], 10.0 + tokenizers.RETRY_S_MIN - 1) == []
    assert store.due([SHA], 10.0 + tokenizers.RETRY_S_MIN) == [SHA]
    assert store.fetch_failed(SHA, "again", 100.0) == 2 * tokenizers.RETRY_S_MIN
    now = 1e3
    for _ in range(20):
        assert store.due([SHA], now) == [SHA]
        delay = store.fetch_failed(SHA, "again", now)
        now += delay
    assert delay == tokenizers.RETRY_S_MAX
    store.due([SHA], 2e9)
    store.fetched(SHA, "counter 2")
    assert store.held(SHA) == "counter 2" and store.last_error(SHA) is None and store.due([SHA, OTHER], 3e9) == []


def test_the_store_is_bounded_and_drops_what_nobody_advertises():
    store = TokenizerStore(held_max=2, fetches_at_once=5)
    shas = [f"{i:064x}" for i in range(4)]
    assert store.due(shas, 0.0) == shas[:2]
    store.fetched(shas[0], "a")
    store.abandoned(shas[1])
    assert store.state(shas[1]) == "wanted"
    assert store.retain(shas[1:]) == [shas[0]] and store.held(shas[0]) is None


def test_a_disagreement_is_reported_once_and_its_end_once():
    store = TokenizerStore()
    assert store.conflicts_changed({"m": (None, SHA)}) == ({"m": (None, SHA)}, [])
    assert store.conflicts_changed({"m": (None, SHA)}) == ({}, [])
    assert store.conflicts_changed({}) == ({}, ["m"])


# --- the poller's fetch ------------------------------------------------------------------------------------


class FakeUpstream:
    """Serves `documents[(url, path)]` (bytes, or an exception to raise); records every GET."""

    def __init__(self, documents: dict[tuple[str, str], Any]) -> None:
        self.documents = documents
        self.gets: list[tuple[str, str, int, dict[str, str]]] = []

    async def get(self, url: str, path: str, timeout_s: float, headers: dict[str, str] | None = None, *,
                  limit_bytes: int = 0) -> tuple[int, bytes]:
        self.gets.append((url, path, limit_bytes, headers or {}))
        found = self.documents.get((url, path), 404)
        if isinstance(found, Exception):
            raise found
        return (found, b"{}") if isinstance(found, int) else (200, found)


def _fleet(*urls: str) -> Fleet:
    fleet = Fleet(list(urls))
    for url in urls:
        fleet.poll_succeeded(url, _info(SHA))
    return fleet


async def test_the_poller_fetches_an_advert_once_from_a_source_that_serves_it_true():
    fleet = _fleet("http://a", "http://b")
    path = "/v1/models/m/tokenizer"
    upstream = FakeUpstream({("http://a", path): UpstreamFailed("GET: timed out"), ("http://b", path): DOCUMENT})
    async with trio.open_nursery() as nursery:
        assert start_tokenizer_fetches(fleet, upstream, nursery) == [SHA]
        assert start_tokenizer_fetches(fleet, upstream, nursery) == []  # in flight: not twice
    counter = fleet.exact_counter("m")
    assert isinstance(counter, ExactCounter) and counter.count_chat(HI) == len(TOKENIZER.encode_chat(HI))
    assert [g[:3] for g in upstream.gets] == [("http://a", path, LIMIT_DOCUMENT_BYTES), ("http://b", path, LIMIT_DOCUMENT_BYTES)]
    async with trio.open_nursery() as nursery:
        assert start_tokenizer_fetches(fleet, upstream, nursery) == []  # held: never fetched again
    assert len(upstream.gets) == 2


async def test_a_document_that_is_not_the_advertised_one_is_refused_and_retried_later():
    fleet = _fleet("http://a")
    upstream = FakeUpstream({("http://a", "/v1/models/m/tokenizer"): DOCUMENT + b" "})
    async with trio.open_nursery() as nursery:
        start_tokenizer_fetches(fleet, upstream, nursery)
    assert fleet.exact_counter("m") is None and fleet.tokenizers.state(SHA) == "failed"
    assert "not the advertised" in fleet.status()["tokenizers"]["m"]["error"]
    async with trio.open_nursery() as nursery:
        assert start_tokenizer_fetches(fleet, upstream, nursery) == []  # backing off
    assert len(upstream.gets) == 1


async def test_a_neuron_answering_garbage_or_an_error_status_never_stops_the_poller():
    fleet = _fleet("http://a")
    path = "/v1/models/m/tokenizer"
    for answer in (500, RuntimeError("a bug"), b'{"tokenizer_json": 1}'):
        fleet.tokenizers = TokenizerStore()
        assert fleet.tokenizers.due([SHA], 0.0) == [SHA]
        await fetch_tokenizer(fleet, FakeUpstream({("http://a", path): answer}), SHA, [("http://a", path)])
        assert fleet.tokenizers.state(SHA) == "failed" and fleet.exact_counter("m") is None, answer


def test_an_advertised_counter_counts_what_only_other_servers_render_differently():
    counter = counter_from_document(DOCUMENT, SHA, "GET /t")
    gen = chat_request({"model": "m", "messages": HI, "chat_template_kwargs": {"enable_thinking": False}})
    assert counter.count(gen) == len(TOKENIZER.encode_chat(HI))  # the kernel engine renders none of it
    assert ExactCounter(files_from_document(DOCUMENT)).count(gen) is None  # a catalogue's: any server


def test_a_document_without_a_chat_template_is_not_used():
    text = json.loads(DOCUMENT)["tokenizer_json"]
    raw = tokenizer_document(text, {})
    with pytest.raises(TokenizerFilesError, match="no 'chat_template'"):
        counter_from_document(raw, document_sha256(raw), "GET /t")


# --- the proxy: the catalogue's tokenizer first, else the fleet's ---------------------------------------


class StubCounter:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def count(self, gen: Any) -> int:
        return self.tokens


async def test_exact_prompt_tokens_uses_the_catalogues_tokenizer_if_named_else_the_fleets(checkpoint):
    fleet = _fleet("http://a")
    fleet.tokenizers.due([SHA], 0.0)
    fleet.tokenizers.fetched(SHA, StubCounter(42))
    gen = chat_request({"model": "m", "messages": HI})
    assert await Proxy(Config(), fleet, None, None).exact_prompt_tokens(gen) == 42  # type: ignore[arg-type]
    named = parse_catalogue({"models": [{"id": "m", "tokenizer": str(checkpoint / "tokenizer.json")}]})
    proxy = Proxy(Config(), fleet, None, None, named)  # type: ignore[arg-type]
    assert await proxy.exact_prompt_tokens(gen) == len(TOKENIZER.encode_chat(HI))
    unnamed = parse_catalogue({"models": [{"id": "m", "limit": {"context": 1024}}]})
    assert await Proxy(Config(), fleet, None, None, unnamed).exact_prompt_tokens(gen) == 42  # type: ignore[arg-type]
    fleet.poll_succeeded("http://a", _info(None))  # the advert is gone
    assert await Proxy(Config(), fleet, None, None).exact_prompt_tokens(gen) is None  # type: ignore[arg-type]
