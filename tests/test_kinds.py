"""The per-kind upstream adapters (cortex/fleet/kinds), pure, then against the stand-in servers over real sockets."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx
import openai
import pytest

from cortex.fleet.kinds import KINDS, base, kind
from cortex.fleet.kinds.base import ModelEntry
from tests.conftest import Proc
from tests.standins import FLAVOURS, Faults, standin

STANDIN_KINDS = sorted(FLAVOURS)
REPORTED_CONTEXT = {"vllm": True, "sglang": True, "llamacpp": True, "tgi": True, "ollama": False, "openai": False}


def err(kind_name: str, status: int, payload: Any, retry_after: str | None = None) -> base.NormalisedError:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return KINDS[kind_name].normalise_error(status, raw, retry_after)


# --- the registry ---------------------------------------------------------------------------


def test_every_kind_the_issue_names_is_registered():
    assert set(KINDS) == {"neuron", "openai", "vllm", "llamacpp", "ollama", "sglang", "tgi"}
    assert all(k.name == name for name, k in KINDS.items())


def test_an_unknown_kind_is_refused_with_the_known_ones_named():
    with pytest.raises(ValueError, match="unknown upstream kind 'kserve'.*vllm"):
        kind("kserve")


def test_token_bytes_max_is_one_for_neurons_byte_tokenizer_and_conservative_for_real_ones():
    assert KINDS["neuron"].token_bytes_max == 1
    assert {k.token_bytes_max for n, k in KINDS.items() if n != "neuron"} == {base.REAL_TOKENIZER_TOKEN_BYTES_MAX}


def test_token_bytes_max_bounds_the_relay_from_above_and_the_charge_from_below():
    vllm = KINDS["vllm"]
    assert vllm.output_bytes_max(10) == 2560
    assert vllm.output_tokens_floor(0) == 0
    assert vllm.output_tokens_floor(1) == 1
    assert vllm.output_tokens_floor(257) == 2
    assert KINDS["neuron"].output_tokens_floor(257) == 257


def test_kinds_that_report_no_context_say_so():
    assert {n for n, k in KINDS.items() if not k.reports_context} == {"ollama", "openai"}


# --- health ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["neuron", "vllm", "sglang", "tgi"])
def test_a_200_health_answer_is_healthy(name):
    assert KINDS[name].judge_health(200, b"").healthy


def test_tgi_unhealthy_answer_is_not_healthy_and_says_why():
    health = KINDS["tgi"].judge_health(503, b'{"error":"unhealthy","error_type":"healthcheck"}')
    assert not health.healthy and "503" in health.reason and "unhealthy" in health.reason


def test_vllm_dead_engine_is_not_healthy():
    assert not KINDS["vllm"].judge_health(503, b"").healthy
    assert KINDS["vllm"].judge_health(500, b"boom").state == "unhealthy"


def test_llamacpp_loading_model_is_not_ready_rather_than_broken():
    body = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
    health = KINDS["llamacpp"].judge_health(503, body)
    assert health.state == "not_ready" and "loading" in health.reason
    assert KINDS["llamacpp"].judge_health(200, b'{"status":"ok"}').healthy


def test_ollama_root_answer_is_healthy():
    assert KINDS["ollama"].health_path == "/"
    assert KINDS["ollama"].judge_health(200, b"Ollama is running").healthy


def test_openai_health_is_its_model_list_and_a_refused_key_is_unhealthy():
    openai_kind = KINDS["openai"]
    assert openai_kind.health_path == "/v1/models"
    assert openai_kind.judge_health(200, b'{"data":[]}').healthy
    refused = openai_kind.judge_health(401, b'{"error":{"message":"Incorrect API key provided."}}')
    assert refused.state == "unhealthy" and "key" in refused.reason
    assert openai_kind.judge_health(429, b"").state == "not_ready"


# --- model lists ---------------------------------------------------------------------------------


def test_neuron_models_carry_both_limits():
    body = {"data": [{"id": "m", "limit": {"context": 1000, "output": 100}}]}
    assert KINDS["neuron"].parse_models({"/v1/models": body}) == {"m": ModelEntry("m", 1000, 100)}


@pytest.mark.parametrize(
    "entry",
    [
        {"id": "m"},
        {"id": "m", "limit": {"context": 1000}},
        {"id": "m", "limit": {"context": True, "output": 10}},
        {"id": "", "limit": {"context": 10, "output": 10}},
        {"id": "m", "limit": {"context": 2**41, "output": 10}},
        {"id": "m", "limit": {"context": 10, "output": 10}, "tokenizer": "byte-level"},
        {"id": "m", "limit": {"context": 10, "output": 10}, "tokenizer": {"message_overhead_tokens": -1}},
        {"id": "m", "limit": {"context": 10, "output": 10}, "tokenizer": {"reply_primer_tokens": 1.5}},
        {"id": "m", "limit": {"context": 10, "output": 10}, "tokenizer": {"reply_primer_tokens": 10**6}},
    ],
)
def test_neuron_malformed_entry_is_a_value_error(entry):
    with pytest.raises(ValueError):
        KINDS["neuron"].parse_models({"/v1/models": {"data": [entry]}})


def test_a_neuron_advertises_its_chat_templates_cost_and_tokenizer():
    body = {"data": [
        {"id": "byte", "limit": {"context": 1000, "output": 100},
         "tokenizer": {"kind": "byte-level", "message_overhead_tokens": 14, "reply_primer_tokens": 6}},
        {"id": "bpe", "limit": {"context": 1000, "output": 100}, "tokenizer": {"kind": "bpe"}},
    ]}
    models = KINDS["neuron"].parse_models({"/v1/models": body})
    assert models["byte"] == ModelEntry("byte", 1000, 100, message_overhead_tokens=14, reply_primer_tokens=6)
    assert models["bpe"].token_bytes_max == base.REAL_TOKENIZER_TOKEN_BYTES_MAX  # floors divide by a real token's bytes
    assert models["bpe"].message_overhead_tokens is None


def test_a_completion_prompts_bos_is_in_the_bound():
    from common.openai_schema import completion_request
    from cortex.budget.estimate import prompt_tokens_bound
    from cortex.fleet.registry import model_info

    gen = completion_request({"model": "m", "prompt": "héllo", "max_tokens": 3})
    with_bos = model_info(ModelEntry("m", 100, 10, completion_prefix_tokens=1), 0, 0)
    assert prompt_tokens_bound(gen, with_bos) == len("héllo".encode()) + 1
    assert prompt_tokens_bound(gen, model_info(ModelEntry("m", 100, 10), 0, 0)) == len("héllo".encode())


def test_the_prompt_bound_uses_the_dearest_advertised_template_and_the_floor_only_exact_costs():
    from common import counting
    from common.openai_schema import chat_request
    from cortex.budget.estimate import estimate, prompt_tokens_floor
    from cortex.fleet.registry import Fleet, model_info

    gen = chat_request({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "héllo"}], "max_tokens": 5})
    text = len("be brief".encode()) + len("héllo".encode())
    fleet = Fleet(["http://a", "http://b"])
    fleet.poll_succeeded("http://a", {"m": model_info(ModelEntry("m", 1000, 100, None, 14, 6), 0, 0)})
    fleet.poll_succeeded("http://b", {"m": model_info(ModelEntry("m", 1000, 100, None, 9, 8), 0, 0)})
    merged = fleet.model_info("m")
    assert (merged.message_overhead_tokens, merged.reply_primer_tokens) == (14, 8)
    assert estimate(gen, merged).prompt_tokens == text + 2 * 14 + 8
    assert prompt_tokens_floor(gen, merged) == text  # advertised costs bound from above only
    plain = model_info(ModelEntry("m", 1000, 100), 0, 0)  # the mock's template: exact, so a floor too
    assert estimate(gen, plain).prompt_tokens == prompt_tokens_floor(gen, plain) == counting.count_chat(gen.messages)


@pytest.mark.parametrize("name", ["vllm", "sglang"])
def test_vllm_and_sglang_context_is_max_model_len(name):
    body = {"object": "list", "data": [
        {"id": "base", "owned_by": name, "max_model_len": 32768},
        {"id": "base-lora", "parent": "base", "max_model_len": 32768},
        {"id": "old", "max_model_len": None},
    ]}
    models = KINDS[name].parse_models({"/v1/models": body})
    assert models == {
        "base": ModelEntry("base", 32768, None),
        "base-lora": ModelEntry("base-lora", 32768, None),
        "old": ModelEntry("old", None, None),
    }


@pytest.mark.parametrize("body", [{}, {"data": "x"}, {"data": [{"id": 3}]}, {"data": [{"id": "m", "max_model_len": "4096"}]}, []])
def test_vllm_malformed_model_list_is_a_value_error(body):
    with pytest.raises(ValueError):
        KINDS["vllm"].parse_models({"/v1/models": body})


def test_a_model_listed_twice_is_a_value_error():
    body = {"data": [{"id": "m", "max_model_len": 10}, {"id": "m", "max_model_len": 20}]}
    with pytest.raises(ValueError, match="twice"):
        KINDS["sglang"].parse_models({"/v1/models": body})


def llamacpp_bodies(n_ctx: Any = 8192, n_predict: Any = -1, models: int = 1) -> dict[str, Any]:
    listed = {"object": "list", "data": [
        {"id": f"model-{i}.gguf", "owned_by": "llamacpp", "meta": {"n_ctx_train": 131072}} for i in range(models)
    ]}
    props = {"default_generation_settings": {"n_ctx": n_ctx, "params": {"n_predict": n_predict}}, "total_slots": 4}
    return {"/v1/models": listed, "/props": props}


def test_llamacpp_context_is_the_slots_n_ctx_not_n_ctx_train():
    assert KINDS["llamacpp"].parse_models(llamacpp_bodies()) == {"model-0.gguf": ModelEntry("model-0.gguf", 8192, None)}


def test_llamacpp_positive_n_predict_is_the_output_limit():
    models = KINDS["llamacpp"].parse_models(llamacpp_bodies(n_predict=512))
    assert models["model-0.gguf"].output_tokens == 512


@pytest.mark.parametrize(
    "bodies",
    [
        llamacpp_bodies(n_ctx=None),
        llamacpp_bodies(n_ctx=0),
        llamacpp_bodies(models=2),
        llamacpp_bodies(models=0),
        {"/v1/models": llamacpp_bodies()["/v1/models"], "/props": {"total_slots": 1}},
        {"/v1/models": llamacpp_bodies()["/v1/models"]},
    ],
)
def test_llamacpp_malformed_or_unsupported_bodies_are_value_errors(bodies):
    with pytest.raises(ValueError):
        KINDS["llamacpp"].parse_models(bodies)


def test_tgi_context_is_max_total_tokens_and_its_input_bound_is_kept():
    info = {"model_id": "org/model", "max_input_tokens": 4095, "max_total_tokens": 4096, "version": "3.3.0"}
    assert KINDS["tgi"].parse_models({"/info": info}) == {"org/model": ModelEntry("org/model", 4096, None, 4095)}


def test_tgi_before_2_named_its_input_bound_max_input_length():
    info = {"model_id": "org/model", "max_input_length": 1024, "max_total_tokens": 2048}
    assert KINDS["tgi"].parse_models({"/info": info})["org/model"].input_tokens == 1024


@pytest.mark.parametrize("info", [{"max_total_tokens": 10}, {"model_id": "m"}, {"model_id": "m", "max_total_tokens": -1}, "x"])
def test_tgi_malformed_info_is_a_value_error(info):
    with pytest.raises(ValueError):
        KINDS["tgi"].parse_models({"/info": info})


def test_ollama_names_come_from_api_tags_without_limits():
    tags = {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}, {"name": "qwen3:8b"}]}
    assert KINDS["ollama"].parse_models({"/api/tags": tags}) == {
        "llama3.2:latest": ModelEntry("llama3.2:latest", None, None),
        "qwen3:8b": ModelEntry("qwen3:8b", None, None),
    }


def test_ollama_names_may_come_from_its_openai_list_instead():
    body = {"object": "list", "data": [{"id": "llama3.2:latest", "owned_by": "library"}]}
    assert list(KINDS["ollama"].parse_models({"/v1/models": body})) == ["llama3.2:latest"]


@pytest.mark.parametrize("tags", [{}, {"models": [{}]}, {"models": ["x"]}])
def test_ollama_malformed_tags_are_value_errors(tags):
    with pytest.raises(ValueError):
        KINDS["ollama"].parse_models({"/api/tags": tags})


def test_openai_models_have_no_limits():
    body = {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "owned_by": "system"}]}
    assert KINDS["openai"].parse_models({"/v1/models": body}) == {"gpt-4o": ModelEntry("gpt-4o", None, None)}


def test_each_kind_parses_exactly_the_paths_it_asks_for():
    for k in KINDS.values():
        with pytest.raises(ValueError):
            k.parse_models({})


# --- errors: context overflow -------------------------------------------------------------------


VLLM_OVERFLOW_MESSAGES = [
    "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the messages, "
    "1000 in the completion). Please reduce the length of the messages or completion.",
    "'max_tokens' or 'max_completion_tokens' is too large: 1000. This model's maximum context length is 4096 tokens "
    "and your request has 4000 input tokens (1000 > 4096 - 4000).",
    "The decoder prompt (length 5000) is longer than the maximum model length of 4096. Make sure that "
    "`max_model_len` is no smaller than the number of text tokens.",
]


@pytest.mark.parametrize("message", VLLM_OVERFLOW_MESSAGES)
def test_vllm_nested_overflow_is_context_length_exceeded(message):
    e = err("vllm", 400, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}})
    assert (e.status, e.type, e.code, e.param) == (400, "invalid_request_error", "context_length_exceeded", "messages")
    assert e.message == message and e.context_overflow and e.retry_after_s is None


@pytest.mark.parametrize("message", VLLM_OVERFLOW_MESSAGES)
def test_vllm_flat_overflow_is_context_length_exceeded(message):
    e = err("vllm", 400, {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400})
    assert e.code == "context_length_exceeded"


@pytest.mark.parametrize(
    "message",
    [
        "The input (5000 tokens) is longer than the model's context length (4096 tokens).",
        "Requested token count exceeds the model's maximum context length of 4096 tokens. You requested a total of "
        "5000 tokens: 4000 tokens from the input messages and 1000 tokens for the completion.",
    ],
)
def test_sglang_flat_overflow_is_context_length_exceeded(message):
    e = err("sglang", 400, {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400})
    assert (e.status, e.code) == (400, "context_length_exceeded")


def test_llamacpp_exceed_context_size_error_is_context_length_exceeded():
    body = {"error": {"code": 400, "message": "request (9412 tokens) exceeds the available context size (8192 tokens), "
                      "try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 9412, "n_ctx": 8192}}
    e = err("llamacpp", 400, body)
    assert (e.status, e.code) == (400, "context_length_exceeded") and "9412" in e.message


@pytest.mark.parametrize(
    "message",
    [
        "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. Given: 2000 `inputs` tokens and "
        "100 `max_new_tokens`",
        "Input validation error: `inputs` must have less than 1024 tokens. Given: 1500",
    ],
)
def test_tgi_validation_overflow_is_context_length_exceeded(message):
    e = err("tgi", 422, {"error": message, "error_type": "validation"})
    assert (e.status, e.code, e.upstream_status) == (400, "context_length_exceeded", 422)


def test_tgi_other_validation_error_is_a_plain_400():
    e = err("tgi", 422, {"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"})
    assert (e.status, e.type, e.code) == (400, "invalid_request_error", None)


def test_openai_overflow_keeps_its_code():
    body = {"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages resulted "
                      "in 9000 tokens.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}
    assert err("openai", 400, body).code == "context_length_exceeded"


def test_neuron_overflow_keeps_its_code():
    body = {"error": {"message": "This model's maximum context length is 100 tokens.", "type": "invalid_request_error",
                      "param": "messages", "code": "context_length_exceeded"}}
    assert err("neuron", 400, body).context_overflow


def test_a_message_that_only_mentions_context_is_not_an_overflow_for_neuron():
    body = {"error": {"message": "context length is fine, the JSON is not", "type": "invalid_request_error", "code": "invalid_json"}}
    e = err("neuron", 400, body)
    assert (e.status, e.code) == (400, "invalid_json")


def test_a_server_error_mentioning_context_is_not_an_overflow():
    e = err("vllm", 500, {"error": {"message": "CUDA error while growing the context length", "type": "InternalServerError", "code": 500}})
    assert (e.status, e.code) == (502, "upstream_error")


# --- errors: overload and Retry-After -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, status, payload",
    [
        ("vllm", 503, {"error": {"message": "The request queue is full.", "type": "ServiceUnavailableError", "code": 503}}),
        ("sglang", 503, {"object": "error", "message": "The request queue is full.", "type": "x", "code": 503}),
        ("llamacpp", 503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
        ("ollama", 503, {"error": {"message": "server busy, please try again.  maximum pending requests exceeded",
                                   "type": "api_error", "param": None, "code": None}}),
        ("tgi", 429, {"error": "Model is overloaded", "error_type": "overloaded"}),
        ("openai", 429, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
        ("neuron", 503, {"error": {"message": "neuron queue is full; retry shortly.", "type": "server_error", "code": "overloaded"}}),
        ("vllm", 529, b"overloaded"),
    ],
)
def test_overload_is_503_overloaded_with_the_servers_retry_after(name, status, payload):
    e = err(name, status, payload, "7")
    assert (e.status, e.type, e.code, e.retry_after_s, e.upstream_status) == (503, "server_error", "overloaded", 7.0, status)
    assert e.overloaded and KINDS[name].label in e.message


@pytest.mark.parametrize(
    "header, seconds", [(None, 1.0), ("", 1.0), ("soon", 1.0), ("0", 1.0), ("0.2", 1.0), ("2.5", 2.5), ("99999", 3600.0),
                        ("nan", 1.0), ("inf", 1.0), ("-5", 1.0), ("７", 1.0)],
)
def test_retry_after_is_clamped_to_one_second_to_an_hour(header, seconds):
    assert err("vllm", 503, b"", header).retry_after_s == seconds


def test_retry_after_as_an_http_date_needs_the_callers_clock():
    header = "Wed, 01 Jan 2025 00:00:30 GMT"
    now = 1735689600.0  # 2025-01-01T00:00:00Z
    assert KINDS["vllm"].normalise_error(503, b"", header, now_epoch_s=now).retry_after_s == 30.0
    assert KINDS["vllm"].normalise_error(503, b"", header).retry_after_s == 1.0


# --- errors: everything else ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_the_upstream_refusing_cortexs_key_is_a_502_not_the_clients_fault(status):
    e = err("openai", status, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "code": "invalid_api_key"}})
    assert (e.status, e.code) == (502, "upstream_error") and "api_key_env" in e.message


def test_vllm_unknown_model_is_a_404_model_not_found():
    e = err("vllm", 404, {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": None, "code": 404}})
    assert (e.status, e.type, e.code) == (404, "invalid_request_error", "model_not_found")


def test_ollama_native_string_error_is_read():
    e = err("ollama", 404, {"error": 'model "x" not found, try pulling it first'})
    assert (e.status, e.code) == (404, "model_not_found") and "try pulling" in e.message


def test_a_client_error_keeps_the_upstreams_param_and_string_code():
    body = {"error": {"message": "Invalid 'temperature'", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}}
    e = err("openai", 400, body)
    assert (e.status, e.param, e.code) == (400, "temperature", "invalid_value")


def test_tgi_generation_failure_is_a_502():
    e = err("tgi", 424, {"error": "Request failed during generation: CUDA OOM", "error_type": "generation"})
    assert (e.status, e.code, e.upstream_status) == (502, "upstream_error", 424)


def test_a_body_that_is_not_json_is_quoted_in_the_message():
    e = err("sglang", 502, b"<html><body>Bad Gateway</body></html>")
    assert e.status == 502 and "Bad Gateway" in e.message


def test_an_empty_body_still_says_what_happened():
    assert "HTTP 500" in err("llamacpp", 500, b"").message


def test_fastapi_detail_is_read():
    assert err("vllm", 404, {"detail": "Not Found"}).message == "Not Found"


def test_a_long_message_is_bounded():
    e = err("vllm", 400, {"error": {"message": "x" * 10_000, "type": "BadRequestError", "code": 400}})
    assert len(e.message) <= base.MESSAGE_MAX_CHARS


def test_normalisation_never_raises_on_garbage():
    for name, k in KINDS.items():
        for status in (400, 404, 422, 429, 500, 503):
            for raw in (b"", b"\xff\xfe", b"[]", b'{"error": 5}', b'{"error": {"message": 7}}', b"null", b"[" * 100_000,
                        b'{"error": {"message": "m", "code": "overloaded"}}', b'{"object": "error", "code": []}'):
                assert 400 <= k.normalise_error(status, raw, "x").status <= 599, (name, status, raw[:20])


# --- errors inside a stream -------------------------------------------------------------------------


def test_tgi_in_band_stream_overflow_is_context_length_exceeded():
    frame = {"error": {"message": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 64. Given: "
                       "105 `inputs` tokens and 5 `max_new_tokens`", "http_status_code": 422}}
    e = KINDS["tgi"].stream_error(frame)
    assert e is not None and e.code == "context_length_exceeded"


def test_tgi_in_band_stream_overload_is_an_overload_despite_its_422():
    e = KINDS["tgi"].stream_error({"error": {"message": "Model is overloaded", "http_status_code": 422}})
    assert e is not None and e.overloaded


def test_vllm_stream_error_event_takes_its_status_from_the_body():
    e = KINDS["vllm"].stream_error({"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
    assert e is not None and (e.status, e.upstream_status) == (502, 500)


@pytest.mark.parametrize("frame", [{"choices": [{"delta": {"content": "x"}}]}, [], "x", None, {"usage": {}}])
def test_an_ordinary_chunk_is_not_a_stream_error(frame):
    assert KINDS["vllm"].stream_error(frame) is None


# --- request bodies ----------------------------------------------------------------------------------


CLIENT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9000,
               "stream_options": {"include_usage": False, "continuous_usage_stats": True}}


def test_streaming_always_asks_for_usage_and_keeps_the_clients_other_options():
    for k in KINDS.values():
        out = k.prepare_body(CLIENT_BODY, output_tokens_max=50, stream=True)
        assert out["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}, k.name


def test_not_streaming_drops_stream_options_which_vllm_and_openai_refuse():
    for k in KINDS.values():
        assert "stream_options" not in k.prepare_body(CLIENT_BODY, output_tokens_max=50, stream=False), k.name


@pytest.mark.parametrize("name", ["neuron", "vllm", "sglang", "llamacpp"])
def test_the_output_bound_replaces_both_fields_the_client_used(name):
    out = KINDS[name].prepare_body(CLIENT_BODY, output_tokens_max=50, stream=False)
    assert (out["max_tokens"], out["max_completion_tokens"]) == (50, 50)
    assert KINDS[name].prepare_body({"model": "m"}, output_tokens_max=50, stream=False) == {"model": "m", "max_tokens": 50}


@pytest.mark.parametrize("name", ["tgi", "ollama"])
def test_tgi_and_ollama_get_max_tokens_only(name):
    out = KINDS[name].prepare_body(CLIENT_BODY, output_tokens_max=50, stream=False)
    assert out["max_tokens"] == 50 and "max_completion_tokens" not in out


def test_openai_chat_gets_max_completion_tokens_only_and_completions_max_tokens():
    chat = KINDS["openai"].prepare_body({"model": "m", "max_tokens": 9}, output_tokens_max=50, stream=False)
    assert chat == {"model": "m", "max_completion_tokens": 50}
    legacy = KINDS["openai"].prepare_body({"model": "m", "max_tokens": 9}, output_tokens_max=50, stream=False, chat=False)
    assert legacy == {"model": "m", "max_tokens": 50}


def test_prepare_body_leaves_the_clients_body_alone():
    before = json.dumps(CLIENT_BODY, sort_keys=True)
    for k in KINDS.values():
        k.prepare_body(CLIENT_BODY, output_tokens_max=1, stream=True)
    assert json.dumps(CLIENT_BODY, sort_keys=True) == before


def test_only_ollama_is_marked_as_truncating_prompts():
    assert [n for n, k in KINDS.items() if k.truncates_prompts] == ["ollama"]


def test_truncation_is_suspected_when_the_reported_prompt_is_far_below_the_bound():
    assert base.prompt_truncation_suspected(2048, 200_000)
    assert not base.prompt_truncation_suspected(2048, 9_000)


# --- against the stand-ins, over real sockets -----------------------------------------------------------


def chat(content: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": content}], **extra}


def poll(k: base.Kind, url: str) -> tuple[base.Health, dict[str, ModelEntry]]:
    with httpx.Client(base_url=url, timeout=5) as client:
        health = client.get(k.health_path)
        bodies = {path: client.get(path).json() for path in k.model_paths}
    return k.judge_health(health.status_code, health.content), k.parse_models(bodies)


def sse_frames(text: str) -> list[Any]:
    frames = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            frames.append(data if data == "[DONE]" else json.loads(data))
    return frames


@pytest.mark.parametrize("name", STANDIN_KINDS)
def test_polling_a_standin_yields_its_model_with_the_kinds_own_limit(name):
    with standin(name, model="m1", context_tokens=3000) as server:
        health, models = poll(KINDS[name], server.url)
    assert health.healthy
    assert models == {"m1": ModelEntry("m1", 3000 if REPORTED_CONTEXT[name] else None, None, 2999 if name == "tgi" else None)}


@pytest.mark.parametrize("name", STANDIN_KINDS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_standin_overload_normalises_to_503_with_its_retry_after(name, stream):
    k = KINDS[name]
    with standin(name, model="m1", faults=Faults(overload_next=1, retry_after="9")) as server:
        body = k.prepare_body(chat(), output_tokens_max=5, stream=stream)
        response = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=5)
    if response.status_code == 200:  # TGI refuses a stream in-band
        first = sse_frames(response.text)[0]
        e = k.stream_error(first)
        assert name == "tgi" and e is not None and e.overloaded
        return
    e = k.normalise_error(response.status_code, response.content, response.headers.get("retry-after"))
    assert (e.status, e.code, e.retry_after_s) == (503, "overloaded", 9.0)


@pytest.mark.parametrize("name", sorted(set(STANDIN_KINDS) - {"ollama"}))
@pytest.mark.parametrize("stream", [False, True])
def test_a_standin_context_overflow_normalises_to_context_length_exceeded(name, stream):
    k = KINDS[name]
    with standin(name, model="m1", context_tokens=64) as server:
        body = k.prepare_body(chat("x" * 400), output_tokens_max=5, stream=stream)
        response = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=5)
    if response.status_code == 200:
        assert name == "tgi" and stream
        e = k.stream_error(sse_frames(response.text)[0])
    else:
        e = k.normalise_error(response.status_code, response.content, response.headers.get("retry-after"))
    assert e is not None and (e.status, e.code) == (400, "context_length_exceeded")


def test_the_ollama_standin_truncates_silently_and_the_adapter_can_tell():
    k = KINDS["ollama"]
    with standin("ollama", model="m1", context_tokens=64) as server:
        messages = [{"role": "system", "content": "be brief"}] + [{"role": "user", "content": "y" * 2000}] * 3
        body = k.prepare_body({"model": "m1", "messages": messages}, output_tokens_max=5, stream=False)
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=5)
    assert response.status_code == 200
    reported = response.json()["usage"]["prompt_tokens"]
    bound = 3 + sum(4 + len(m["content"].encode()) for m in messages)  # cortex's byte-level bound
    assert reported <= 64 and base.prompt_truncation_suspected(reported, bound)


@pytest.mark.parametrize("name", STANDIN_KINDS)
def test_a_prepared_body_is_accepted_where_the_clients_own_would_not_be(name):
    """TGI refuses max_tokens with max_completion_tokens; vLLM and OpenAI refuse stream_options without stream."""
    k = KINDS[name]
    client_body = chat(max_tokens=5, max_completion_tokens=5, stream_options={"include_usage": True})
    with standin(name, model="m1") as server:
        prepared = httpx.post(server.url + "/v1/chat/completions",
                              json=k.prepare_body(client_body, output_tokens_max=5, stream=False), timeout=5)
        raw = httpx.post(server.url + "/v1/chat/completions", json=client_body, timeout=5)
    assert prepared.status_code == 200, prepared.text
    assert prepared.json()["usage"]["completion_tokens"] == 5
    if name in ("tgi", "vllm", "openai"):
        assert raw.status_code in (400, 422)


@pytest.mark.parametrize("name", STANDIN_KINDS)
def test_a_standin_stream_ends_with_usage_then_done_and_respects_token_bytes_max(name):
    k = KINDS[name]
    with standin(name, model="m1", reply_tokens=8) as server:
        body = k.prepare_body(chat(), output_tokens_max=6, stream=True)
        response = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=5)
    frames = sse_frames(response.text)
    assert response.status_code == 200 and frames[-1] == "[DONE]"
    usage = frames[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    text = "".join(c["delta"].get("content") or "" for f in frames[:-2] for c in f["choices"])
    relayed = len(text.encode())
    assert relayed <= k.output_bytes_max(6) and k.output_tokens_floor(relayed) <= 6 <= relayed


@pytest.mark.parametrize("name", STANDIN_KINDS)
def test_the_openai_sdk_reads_a_standin_streamed_and_not(name):
    with standin(name, model="m1", reply_tokens=4) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="upstream-key", max_retries=0, timeout=5)
        whole = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        parts = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                               stream=True, stream_options={"include_usage": True})
        chunks = list(parts)
        legacy = client.completions.create(model="m1", prompt="hi", max_tokens=3)
    assert whole.choices[0].message.content == "alpha bravo charlie delta "
    assert whole.usage.completion_tokens == 4
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha bravo charlie delta "
    assert chunks[-1].usage.completion_tokens == 4
    assert legacy.choices[0].text == "alpha bravo charlie " and legacy.choices[0].finish_reason == "length"


def test_llamacpp_standin_is_not_ready_while_loading():
    k = KINDS["llamacpp"]
    with standin("llamacpp", model="m1", faults=Faults(unhealthy=True)) as server:
        response = httpx.get(server.url + k.health_path, timeout=5)
        assert k.judge_health(response.status_code, response.content).state == "not_ready"
        refused = httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=5)
        server.faults.unhealthy = False
        response = httpx.get(server.url + k.health_path, timeout=5)
    assert refused.status_code == 503
    assert k.normalise_error(refused.status_code, refused.content).overloaded  # another replica may take it
    assert k.judge_health(response.status_code, response.content).healthy


def test_a_standin_records_headers_and_enforces_its_own_key():
    k = KINDS["vllm"]
    with standin("vllm", model="m1", api_key="upstream-secret") as server:
        refused = httpx.post(server.url + "/v1/chat/completions", json=chat(), headers={"authorization": "Bearer sk-cx-client"})
        served = httpx.post(server.url + "/v1/chat/completions", json=chat(), headers={"authorization": "Bearer upstream-secret"})
        seen = httpx.get(server.url + "/_standin/requests").json()
    assert k.normalise_error(refused.status_code, refused.content).status == 502
    assert served.status_code == 200
    assert [r["headers"]["authorization"] for r in seen] == ["Bearer sk-cx-client", "Bearer upstream-secret"]


def test_a_standin_stream_can_die_part_way():
    with standin("sglang", model="m1", faults=Faults(die_next=1, die_after_tokens=2)) as server:
        with pytest.raises(httpx.HTTPError):
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True), timeout=5) as response:
                for _ in response.iter_bytes():
                    pass
        assert server.stats["died_total"] == 1
        again = httpx.post(server.url + "/v1/chat/completions", json=chat(stream=True), timeout=5)
    assert sse_frames(again.text)[-1] == "[DONE]"


def test_a_standin_keeps_a_connection_alive_across_requests():
    with standin("tgi", model="m1") as server, httpx.Client(base_url=server.url, timeout=5) as client:
        for _ in range(5):
            assert client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
        assert client.get("/health").status_code == 200
    assert server.stats["requests_total"] == 6


def test_faults_can_be_set_over_http_for_a_standin_process(tmp_path):
    proc = Proc([sys.executable, "-m", "tests.standins", "tgi", "--model", "m1", "--context", "2048"], tmp_path / "tgi.log")
    try:
        proc.wait_ready()
        assert proc.announcement["kind"] == "tgi"
        health, models = poll(KINDS["tgi"], proc.url)
        assert health.healthy and models["m1"].context_tokens == 2048
        assert httpx.post(proc.url + "/_standin/faults", json={"overload_next": 1}).status_code == 200
        refused = httpx.post(proc.url + "/v1/chat/completions", json=chat(), timeout=5)
        assert KINDS["tgi"].normalise_error(refused.status_code, refused.content).overloaded
        assert httpx.get(proc.url + "/_standin/stats").json()["refused_total"] == 1
    finally:
        proc.stop()
