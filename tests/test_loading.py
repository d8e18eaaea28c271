"""Model references, the bundled-model cache and the NDIF entry point."""

import json
import socket

import pytest

from mechme.errors import ModelNotFoundError, RemoteError, UnsupportedArchitectureError
from mechme.models import bundled, load_model
from mechme.models.tiny import tiny_model


def test_missing_path_names_value():
    with pytest.raises(ModelNotFoundError, match="'/no/such/model'"):
        load_model("/no/such/model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file .* not found"):
        load_model(str(tmp_path / "absent.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_uncached_hub_id_is_not_downloaded():
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_model("nobody-org/no-such-model-xyz")


def test_saved_folder_loads_and_hashes(tmp_path):
    tiny = tiny_model("qwen2")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.arch.name == "qwen2"
    assert len(loaded.weights_sha256) == 64
    assert load_model(str(tmp_path)).weights_sha256 == loaded.weights_sha256


def test_unsupported_folder_names_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128)).save_pretrained(tmp_path)
    tiny_model("llama").tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))


def test_ndif_without_key_fails_before_network(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr("mechme.models.loading.ndif_api_key", lambda: None)

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(RemoteError, match="export NDIF_API_KEY"):
        load_model("ndif:meta-llama/Llama-3.1-8B")


def _fake_cache(tmp_path, monkeypatch, record_changes):
    monkeypatch.setenv("MECHME_CACHE_DIR", str(tmp_path))
    folder = bundled.cache_dir("smollm2-135m")
    folder.mkdir(parents=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(b"weights")
    record = bundled._expected_record(bundled.BUNDLED["smollm2-135m"])
    stat = weights.stat()
    record["weights_size"] = stat.st_size
    record["weights_sha256"] = bundled.file_sha256(str(weights), stat.st_size, stat.st_mtime_ns)
    record.update(record_changes)
    (folder / bundled.CACHE_RECORD).write_text(json.dumps(record))
    return folder


def test_cache_status_ok(tmp_path, monkeypatch):
    _fake_cache(tmp_path, monkeypatch, {})
    assert bundled.cache_status("smollm2-135m") == "ok"


def test_cache_status_stale_after_upgrade(tmp_path, monkeypatch):
    _fake_cache(tmp_path, monkeypatch, {"transformers_version": "0.0.1"})
    assert bundled.cache_status("smollm2-135m") == "stale"


def test_cache_status_corrupt_weights(tmp_path, monkeypatch):
    folder = _fake_cache(tmp_path, monkeypatch, {})
    (folder / "model.safetensors").write_bytes(b"weightz")
    assert bundled.cache_status("smollm2-135m") == "corrupt"


def test_cache_status_missing_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHME_CACHE_DIR", str(tmp_path))
    assert bundled.cache_status("gemma3-270m") == "missing"
    folder = _fake_cache(tmp_path, monkeypatch, {})
    assert bundled.clear_cache("smollm2-135m") == [folder]
    assert not folder.exists()
