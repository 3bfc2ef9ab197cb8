"""Checkpoints: make_checkpoint writes a real HF directory that loads; broken ones name the file and field."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from neuron.engines.kernel.checkpoint import PRESETS, make_checkpoint, preset_config, preset_tensors
from neuron.engines.kernel.config import KernelConfigError, load_config
from neuron.engines.kernel.loader import bf16_round, iter_tensors, load_weights
from neuron.engines.kernel.runner import StepInput, estimate_weight_bytes, load_runner

PROMPT = "Checkpoints, ünïcode ✓"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_checkpoint("synth-tiny", str(tmp_path_factory.mktemp("ckpt") / "synth-tiny")))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _logits(runner, prompt: str = PROMPT) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = runner.step([StepInput(1, runner.tokenizer.encode_chat([{"role": "user", "content": prompt}]))])
    runner.free(1)
    return out


def test_make_checkpoint_writes_the_hf_layout(written: Path) -> None:
    assert sorted(os.listdir(written)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]
    config = json.loads((written / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "chat_template" in json.loads((written / "tokenizer_config.json").read_text())
    assert set(load_file(str(written / "model.safetensors"))) >= {"model.embed_tokens.weight", "lm_head.weight"}


def test_a_written_checkpoint_loads_with_the_presets_weights_and_generates(written: Path) -> None:
    loaded = load_weights(str(written), load_config(str(written)))
    config = preset_config("synth-tiny")
    tensors = preset_tensors("synth-tiny")
    for name, array in iter_tensors(loaded, config):
        np.testing.assert_array_equal(array, tensors[name], err_msg=name)
    from_path = load_runner(path=str(written), backend="numpy", device="cpu")
    from_preset = load_runner(preset="synth-tiny", backend="numpy", device="cpu")
    assert from_path.name == "synth-tiny" and from_path.tokenizer.kind == "byte-level"
    assert from_path.tokenizer.eos_token_ids == from_preset.tokenizer.eos_token_ids
    assert (from_path.tokenizer.message_overhead_tokens, from_path.tokenizer.reply_primer_tokens) == (
        from_preset.tokenizer.message_overhead_tokens, from_preset.tokenizer.reply_primer_tokens)
    np.testing.assert_array_equal(_logits(from_path), _logits(from_preset))
    tokens = []
    ids = from_path.tokenizer.encode("Once")
    logits = from_path.step([StepInput(7, ids)])
    for _ in range(8):
        tokens.append(int(np.argmax(logits[0])))
        logits = from_path.step([StepInput(7, [tokens[-1]])])
    assert from_path.kv_tokens_used() == len(ids) + 8 and len(tokens) == 8


def test_served_name_overrides_the_directory_name(written: Path) -> None:
    assert load_runner(path=str(written), served_name="tiny-x", backend="numpy", device="cpu").name == "tiny-x"


def test_a_sharded_checkpoint_loads(tmp_path: Path, written: Path) -> None:
    path = make_checkpoint("synth-tiny", str(tmp_path / "sharded"), shards=2)
    index = json.loads((Path(path) / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    np.testing.assert_array_equal(_logits(load_runner(path=path, backend="numpy", device="cpu")),
                                  _logits(load_runner(path=str(written), backend="numpy", device="cpu")))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_load_upcast_to_float32(tmp_path: Path, dtype: str) -> None:
    path = make_checkpoint("synth-tiny", str(tmp_path / dtype), dtype=dtype)
    config = load_config(path)
    loaded = dict(iter_tensors(load_weights(path, config), config))
    rounded = (lambda a: a.astype(np.float16).astype(np.float32)) if dtype == "float16" else bf16_round
    for name, array in preset_tensors("synth-tiny").items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], rounded(array), err_msg=name)
        assert not np.array_equal(loaded[name], array) or array.size < 8  # really stored in half precision
    runner = load_runner(path=path, backend="numba", device="cpu")
    assert _logits(runner).shape == (1, config.vocab_size)


def test_tied_embeddings_load_without_lm_head(tmp_path: Path) -> None:
    path = make_checkpoint("synth-tiny", str(tmp_path / "tied"), tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(os.path.join(path, "model.safetensors"))
    config = load_config(path)
    weights = load_weights(path, config)
    assert weights.lm_head is weights.embed
    runner = load_runner(path=path, backend="numpy", device="cpu")
    assert runner.weight_bytes == config.param_count() * 4 == estimate_weight_bytes(path=path)


def test_qwen2_biases_load_and_numba_matches_numpy(tmp_path: Path) -> None:
    path = make_checkpoint("synth-tiny", str(tmp_path / "qwen2"), model_type="qwen2")
    assert "model.layers.0.self_attn.q_proj.bias" in load_file(os.path.join(path, "model.safetensors"))
    a = _logits(load_runner(path=path, backend="numpy", device="cpu"))
    b = _logits(load_runner(path=path, backend="numba", device="cpu"))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_a_preset_loads_the_same_weights_as_its_checkpoint_even_when_large() -> None:
    # synth-small is ~100M parameters; check its shape cheaply rather than building it here.
    config = PRESETS["synth-small"]
    assert 90e6 <= config.param_count() <= 110e6
    assert estimate_weight_bytes(preset="synth-small") == config.param_count() * 4
    assert estimate_weight_bytes(preset="synth-small", device="cuda") == config.param_count() * 2


# -- broken checkpoints ---------------------------------------------------------------------------


def test_a_missing_shard_names_the_index_and_the_shard(tmp_path: Path) -> None:
    path = Path(make_checkpoint("synth-tiny", str(tmp_path / "s"), shards=2))
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(KernelConfigError, match=r"model\.safetensors\.index\.json: field 'weight_map' lists shard "
                                                r"'model-00002-of-00002\.safetensors', which is missing"):
        load_runner(path=str(path), backend="numpy", device="cpu")


def test_a_tensor_with_the_wrong_shape_names_it_and_both_shapes(tmp_path: Path, written: Path) -> None:
    path = _copy(written, tmp_path / "bad-shape")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((175, 64), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(KernelConfigError) as info:
        load_runner(path=str(path), backend="numpy", device="cpu")
    assert str(info.value) == ("model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' has shape [175, 64], "
                               "but config.json implies [176, 64]")


def test_a_missing_tensor_is_named(tmp_path: Path, written: Path) -> None:
    path = _copy(written, tmp_path / "no-norm")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(KernelConfigError, match=r"model\.safetensors: tensor 'model\.norm\.weight' is missing"):
        load_runner(path=str(path), backend="numpy", device="cpu")


def test_an_unknown_model_type_names_config_json_and_the_field(tmp_path: Path, written: Path) -> None:
    path = _copy(written, tmp_path / "gpt")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(KernelConfigError, match=r"config\.json: field 'model_type' is 'gpt_neox'; supported: llama"):
        load_runner(path=str(path), backend="numpy", device="cpu")
    with pytest.raises(KernelConfigError, match="model_type"):
        estimate_weight_bytes(path=str(path))


def test_no_tokenizer_json_is_named(tmp_path: Path, written: Path) -> None:
    path = _copy(written, tmp_path / "no-tok")
    (path / "tokenizer.json").unlink()
    with pytest.raises(KernelConfigError, match=r"tokenizer\.json: file not found"):
        load_runner(path=str(path), backend="numpy", device="cpu")


def test_bad_config_fields_are_named(tmp_path: Path, written: Path) -> None:
    path = _copy(written, tmp_path / "bad-config")
    config = json.loads((path / "config.json").read_text())
    for field, value, match in [
        ("num_key_value_heads", 3, "'num_key_value_heads' \\(3\\) must divide"),
        ("hidden_size", "64", "'hidden_size' must be int"),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, "rope_scaling.rope_type' is 'yarn'"),
    ]:
        (path / "config.json").write_text(json.dumps(dict(config, **{field: value})))
        with pytest.raises(KernelConfigError, match=match):
            load_runner(path=str(path), backend="numpy", device="cpu")
    (path / "config.json").unlink()
    with pytest.raises(KernelConfigError, match=r"config\.json: file not found"):
        load_runner(path=str(path), backend="numpy", device="cpu")


def test_eos_ids_from_generation_config_are_added(tmp_path: Path, written: Path) -> None:
    path = _copy(written, tmp_path / "eos")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [65, 66]}))
    runner = load_runner(path=str(path), backend="numpy", device="cpu")
    assert {65, 66} <= runner.tokenizer.eos_token_ids


def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    from neuron.engines.kernel.runner import cuda_available

    if cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(KernelConfigError, match="no CUDA device"):
        load_runner(preset="synth-tiny", device="cuda")
    with pytest.raises(KernelConfigError, match="no CUDA device"):
        load_runner(preset="synth-tiny", backend="cupy")
    assert load_runner(preset="synth-tiny").backend == "numba"  # auto on a CPU-only host


def test_unknown_presets_and_backends_are_named() -> None:
    with pytest.raises(KernelConfigError, match="unknown preset 'synth-huge'"):
        load_runner(preset="synth-huge")
    with pytest.raises(KernelConfigError, match="backend: 'torch'"):
        load_runner(preset="synth-tiny", backend="torch")
    with pytest.raises(KernelConfigError, match="exactly one"):
        load_runner()


def test_config_variants_of_real_checkpoints_parse() -> None:
    from neuron.engines.kernel.config import parse_config

    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64}
    mistral = parse_config(dict(base, model_type="mistral", sliding_window=16))
    assert mistral.max_position_embeddings == 16  # the context wall is the window: full attention is exact there
    qwen2 = parse_config(dict(base, model_type="qwen2", sliding_window=16, use_sliding_window=False))
    assert qwen2.attention_bias and qwen2.max_position_embeddings == 64
    with pytest.raises(KernelConfigError, match="'use_sliding_window' is true"):
        parse_config(dict(base, model_type="qwen2", use_sliding_window=True))
    v5 = parse_config(dict(base, model_type="llama", rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0}))
    assert v5.rope_theta == 1234.0 and v5.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert parse_config(dict(base, model_type="llama", tie_word_embeddings=True)).head_dim == 4
