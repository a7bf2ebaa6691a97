"""orbax checkpoints: round trips, the load cache (convert once, then restore), `jaxserve convert`."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import models.loader
from models import checkpoint
from models.config import ModelConfig
from models.loader import DEFAULT_MODEL, convert, load_model, resolve_model_path
from models.weights import iter_safetensors, load_state
from tests.engine_utils import tiny_tokenizer
from tests.helpers import sequence_logits

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "parity")
IDS = list(range(3, 40))


def fixture_copy(tmp_path, name, *, tokenizer=True):
    """A copy of a parity fixture; fixtures carry no tokenizer, so a word-level one is added."""
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    if tokenizer:
        tiny_tokenizer(ModelConfig.from_folder(dst).vocab_size).save(str(dst))
    return dst


def count_conversions(monkeypatch):
    calls = []
    real = models.loader._convert

    def spy(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(models.loader, "_convert", spy)
    return calls


@pytest.mark.parametrize("name", ["qwen2", "qwen3_moe", "mixtral_sharded_legacy", "smollm2"])
def test_save_and_load_checkpoint_round_trip_is_bit_exact(tmp_path, name):
    folder = os.path.join(FIXTURES, name)
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    model = load_state(ModelConfig.from_hf(hf_config), iter_safetensors(folder))
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), model, hf_config)
    assert checkpoint.is_checkpoint(tmp_path / "ckpt")
    restored, restored_hf = checkpoint.load_checkpoint(str(tmp_path / "ckpt"))
    assert restored_hf == hf_config and restored.config == model.config
    np.testing.assert_array_equal(sequence_logits(model, IDS), sequence_logits(restored, IDS))


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    folder = fixture_copy(tmp_path, "llama")
    dst = tmp_path / "converted"
    convert(str(folder), str(dst))
    meta = json.loads((dst / checkpoint.CONFIG_FILE).read_text())
    (dst / checkpoint.CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(ValueError, match="checkpoint format 0, expected"):
        load_model(str(dst))


def test_load_cache_converts_once_then_restores(tmp_path, monkeypatch):
    folder = fixture_copy(tmp_path, "qwen3")
    cache = tmp_path / "cache"
    conversions = count_conversions(monkeypatch)
    first = load_model(str(folder), use_cache=True, cache_dir=str(cache))
    cached = checkpoint.cache_path_for(str(folder), jnp.float32, str(cache))
    assert conversions == [str(folder)]
    assert checkpoint.is_checkpoint(cached) and os.path.dirname(cached) == str(cache / "checkpoints")

    second = load_model(str(folder), use_cache=True, cache_dir=str(cache))
    assert conversions == [str(folder)], "converted again although a cached checkpoint exists"
    assert os.listdir(cache / "checkpoints") == [os.path.basename(cached)]
    np.testing.assert_array_equal(sequence_logits(first.model, IDS), sequence_logits(second.model, IDS))
    assert second.tokenizer.encode("w5 w7") == [5, 7]


def test_use_cache_false_writes_nothing(tmp_path, monkeypatch):
    folder = fixture_copy(tmp_path, "llama")
    conversions = count_conversions(monkeypatch)
    for _ in range(2):
        load_model(str(folder), use_cache=False, cache_dir=str(tmp_path / "cache"))
    assert len(conversions) == 2 and not (tmp_path / "cache").exists()


def test_cache_dir_defaults_to_jaxserve_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path / "env-cache"))
    folder = fixture_copy(tmp_path, "llama")
    load_model(str(folder))
    assert checkpoint.is_checkpoint(checkpoint.cache_path_for(str(folder), jnp.float32))
    assert checkpoint.cache_path_for(str(folder), jnp.float32).startswith(str(tmp_path / "env-cache"))


def test_weights_overwritten_in_place_are_converted_again(tmp_path, monkeypatch):
    """Overwriting model.safetensors (as `cp` does) leaves the folder's own mtime unchanged: the
    cache key must follow the files, or a stale checkpoint would be restored."""
    folder = fixture_copy(tmp_path, "llama")
    cache = str(tmp_path / "cache")
    before = load_model(str(folder), cache_dir=cache)
    key = checkpoint.cache_path_for(str(folder), jnp.float32, cache)

    edited = load_file(str(folder / "model.safetensors"))
    edited["model.norm.weight"] = edited["model.norm.weight"] * 2
    save_file(edited, str(tmp_path / "new.safetensors"))
    folder_stat = os.stat(folder)
    shutil.copyfile(tmp_path / "new.safetensors", folder / "model.safetensors")
    os.utime(folder, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))  # make sure: folder untouched

    assert checkpoint.cache_path_for(str(folder), jnp.float32, cache) != key
    conversions = count_conversions(monkeypatch)
    after = load_model(str(folder), cache_dir=cache)
    assert conversions == [str(folder)]
    assert not np.array_equal(sequence_logits(before.model, IDS), sequence_logits(after.model, IDS))


def test_cache_key_follows_file_size_mtime_and_dtype(tmp_path):
    gguf = tmp_path / "model.gguf"  # only stat()ed, never read
    gguf.write_bytes(b"x" * 10)
    key = checkpoint.cache_path_for(str(gguf), jnp.float32, str(tmp_path))
    assert os.path.basename(key).startswith("model-")
    assert checkpoint.cache_path_for(str(gguf), jnp.float32, str(tmp_path)) == key  # stable
    assert checkpoint.cache_path_for(str(gguf), jnp.bfloat16, str(tmp_path)) != key
    os.utime(gguf, ns=(0, 0))
    touched = checkpoint.cache_path_for(str(gguf), jnp.float32, str(tmp_path))
    assert touched != key
    gguf.write_bytes(b"x" * 11)
    os.utime(gguf, ns=(0, 0))
    assert checkpoint.cache_path_for(str(gguf), jnp.float32, str(tmp_path)) != touched


def test_folder_cache_key_follows_added_files(tmp_path):
    folder = fixture_copy(tmp_path, "llama", tokenizer=False)
    key = checkpoint.cache_path_for(str(folder), jnp.float32, str(tmp_path))
    (folder / "generation_config.json").write_text("{}")
    assert checkpoint.cache_path_for(str(folder), jnp.float32, str(tmp_path)) != key


def test_jaxserve_convert_writes_a_loadable_folder(tmp_path):
    from server.main import main

    src = fixture_copy(tmp_path, "mixtral")
    (src / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "eos_token_id": [1, 7]}))
    dst = tmp_path / "converted"
    assert main(["convert", str(src), str(dst)]) == 0
    assert checkpoint.is_checkpoint(dst) and resolve_model_path(str(dst)) == str(dst)
    loaded = load_model(str(dst), use_cache=False)
    direct = load_model(str(src), use_cache=False)
    np.testing.assert_array_equal(sequence_logits(loaded.model, IDS), sequence_logits(direct.model, IDS))
    assert loaded.tokenizer.encode("w5 w7") == [5, 7]
    assert loaded.tokenizer.eos_token_ids == direct.tokenizer.eos_token_ids == {1, 7}
    assert loaded.generation_config == direct.generation_config
    meta = json.loads((dst / checkpoint.CONFIG_FILE).read_text())
    assert meta["hf_config"]["architectures"] == ["MixtralForCausalLM"] and meta["dtype"] == "float32"


def test_jaxserve_convert_bfloat16(tmp_path):
    from server.main import main

    src = fixture_copy(tmp_path, "qwen2")
    dst = tmp_path / "converted"
    assert main(["convert", str(src), str(dst), "--dtype", "bfloat16"]) == 0
    assert json.loads((dst / checkpoint.CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    as_saved = load_model(str(dst), dtype=jnp.bfloat16)
    upcast = load_model(str(dst))  # float32 by default: cast after the restore
    direct = load_model(str(src), dtype=jnp.bfloat16, use_cache=False)
    import jax

    from flax import nnx

    for a, b, c in zip(*(jax.tree.leaves(nnx.state(m.model, nnx.Param)) for m in (as_saved, direct, upcast))):
        assert a.dtype == jnp.bfloat16 and c.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(c))


def test_convert_without_tokenizer_fails_clearly_and_writes_nothing(tmp_path):
    """Parity fixtures carry no tokenizer: convert (and load_model) say so before converting."""
    src = fixture_copy(tmp_path, "llama", tokenizer=False)
    dst = tmp_path / "converted"
    with pytest.raises(FileNotFoundError, match=f"{src}: no tokenizer.json"):
        convert(str(src), str(dst))
    assert not dst.exists()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_model(str(src), cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("model", ["no-such-model", "missing.gguf", "."])
def test_unknown_model_names_the_accepted_forms(model):
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path(model)
    message = str(info.value)
    assert repr(model) in message
    for form in (DEFAULT_MODEL, ".gguf file", "HF folder with config.json", "jaxserve checkpoint folder"):
        assert form in message


def test_resolve_model_path_accepts_each_form(tmp_path):
    folder = os.path.join(FIXTURES, "llama")
    assert resolve_model_path(folder) == folder
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model_path(str(gguf)) == str(gguf)


@pytest.mark.default_model
@pytest.mark.slow
def test_default_model_convert_then_load_matches_the_gguf(tmp_path):
    from server.main import main

    gguf = resolve_model_path(DEFAULT_MODEL)
    dst = tmp_path / "smollm2"
    assert main(["convert", DEFAULT_MODEL, str(dst)]) == 0
    converted = load_model(str(dst))
    direct = load_model(gguf, use_cache=False)
    assert converted.config == direct.config and converted.config.num_queries_per_kv == 3
    assert converted.tokenizer.encode("Hello world!") == [19556, 905, 17]
    ids = converted.tokenizer.encode("The capital of France is")
    assert ids == direct.tokenizer.encode("The capital of France is")
    assert converted.tokenizer.eos_token_ids == direct.tokenizer.eos_token_ids
    assert converted.tokenizer.chat_template == direct.tokenizer.chat_template
    np.testing.assert_array_equal(sequence_logits(converted.model, ids), sequence_logits(direct.model, ids))


def _truncate(path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _zero_fill(path) -> None:
    """Same size, so the manifest's quick check passes and orbax itself meets the damage."""
    with open(path, "r+b") as f:
        f.write(b"\0" * os.path.getsize(path))


def _data_files(folder) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(os.path.join(folder, "state")) for name in names]


def _largest_data_file(folder) -> str:
    return max(_data_files(folder), key=os.path.getsize)


CORRUPTIONS = {
    "truncated data file": lambda folder: _truncate(_largest_data_file(folder)),
    "zeroed data file": lambda folder: _zero_fill(_largest_data_file(folder)),
    # Every concurrent read fails: orbax's abandoned reads must not print a traceback each.
    "all data files zeroed": lambda folder: [_zero_fill(path) for path in _data_files(folder)],
    "truncated config": lambda folder: _truncate(os.path.join(folder, checkpoint.CONFIG_FILE)),
    "no manifest": lambda folder: os.remove(os.path.join(folder, checkpoint.MANIFEST_FILE)),
}


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_weight_cache_is_reported_in_one_line_and_rebuilt(tmp_path, monkeypatch, caplog, corruption):
    folder = fixture_copy(tmp_path, "qwen3")
    cache = tmp_path / "cache"
    first = load_model(str(folder), cache_dir=str(cache))
    cached = checkpoint.cache_path_for(str(folder), jnp.float32, str(cache))
    CORRUPTIONS[corruption](cached)
    conversions = count_conversions(monkeypatch)

    caplog.clear()
    with caplog.at_level("INFO"):
        healed = load_model(str(folder), cache_dir=str(cache))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert len(warnings) == 1 and f"weight cache {cached} could not be restored" in warnings[0], warnings
    assert "\n" not in warnings[0] and "deleted it, converting" in warnings[0]
    assert conversions == [str(folder)]
    # The damaged folder is gone (deleted, not kept aside), a fresh one in its place.
    assert os.listdir(cache / "checkpoints") == [os.path.basename(cached)] and checkpoint.is_checkpoint(cached)
    np.testing.assert_array_equal(sequence_logits(first.model, IDS), sequence_logits(healed.model, IDS))

    caplog.clear()
    with caplog.at_level("INFO"):
        again = load_model(str(folder), cache_dir=str(cache))
    assert conversions == [str(folder)], "the rebuilt cache was not restored"
    assert not [r for r in caplog.records if r.levelno >= 30]
    assert any("restored cached checkpoint" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(sequence_logits(first.model, IDS), sequence_logits(again.model, IDS))


def test_damaged_weight_cache_message_names_the_tensor_and_the_file(tmp_path, caplog):
    """orbax's own error is a page of TensorStore spec; the line carries its root cause."""
    folder = fixture_copy(tmp_path, "qwen3")
    load_model(str(folder), cache_dir=str(tmp_path / "cache"))
    _zero_fill(_largest_data_file(checkpoint.cache_path_for(str(folder), jnp.float32, str(tmp_path / "cache"))))
    with caplog.at_level("WARNING"):
        load_model(str(folder), cache_dir=str(tmp_path / "cache"))
    (message,) = [r.getMessage() for r in caplog.records]
    # Which damaged tensor TensorStore reads first varies from run to run: any of the model's.
    named = re.search(r'Error reading "([\w.]+)/[\d.]+"', message)
    assert named and named.group(1).split(".")[0] in {"layers", "lm_head", "embed_tokens", "norm"}, message
    assert "TensorStore" not in message and str(tmp_path / "cache") in message


def test_truncated_data_file_is_caught_by_the_manifest(tmp_path):
    folder = fixture_copy(tmp_path, "llama")
    dst = tmp_path / "converted"
    convert(str(folder), str(dst))
    data = _largest_data_file(dst)
    _truncate(data)
    name = os.path.relpath(data, dst)
    with pytest.raises(checkpoint.CheckpointError, match=f"{name} has .* bytes, the manifest says"):
        checkpoint.verify_checkpoint(str(dst))


def test_damaged_checkpoint_folder_is_refused_and_kept(tmp_path):
    """A folder the user converted may have no source left: it is named, never deleted."""
    folder = fixture_copy(tmp_path, "llama")
    dst = tmp_path / "converted"
    convert(str(folder), str(dst))
    _truncate(dst / checkpoint.CONFIG_FILE)
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint folder {dst} could not be restored "
                       r"\(CheckpointError: jaxserve_config.json has .*; convert it again"):
        load_model(str(dst))
    assert checkpoint.is_checkpoint(dst)


def test_folder_without_manifest_says_convert_again(tmp_path):
    folder = fixture_copy(tmp_path, "llama")
    dst = tmp_path / "converted"
    convert(str(folder), str(dst))
    os.remove(dst / checkpoint.MANIFEST_FILE)
    with pytest.raises(FileNotFoundError, match=f"without {checkpoint.MANIFEST_FILE}.*jaxserve convert SRC {dst}"):
        load_model(str(dst))


def _llama_model(tmp_path):
    folder = fixture_copy(tmp_path, "llama", tokenizer=False)
    with open(folder / "config.json") as f:
        hf_config = json.load(f)
    return folder, load_state(ModelConfig.from_hf(hf_config), iter_safetensors(str(folder))), hf_config


def test_interrupted_save_leaves_nothing_at_the_path(tmp_path):
    _, net, hf_config = _llama_model(tmp_path)

    def crash(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(tmp_path / "ckpt"), net, hf_config, add_files=crash)
    assert os.listdir(tmp_path) == ["llama"]


def test_save_keeps_a_checkpoint_another_process_wrote_first(tmp_path):
    folder, net, hf_config = _llama_model(tmp_path)
    path = str(tmp_path / "ckpt")
    assert checkpoint.save_checkpoint(path, net, hf_config, source=str(folder))
    manifest = (tmp_path / "ckpt" / checkpoint.MANIFEST_FILE).read_text()
    assert not checkpoint.save_checkpoint(path, net, hf_config, replace=False)
    assert (tmp_path / "ckpt" / checkpoint.MANIFEST_FILE).read_text() == manifest
    assert checkpoint.save_checkpoint(path, net, hf_config)  # replace (jaxserve convert)
    assert json.loads((tmp_path / "ckpt" / checkpoint.MANIFEST_FILE).read_text())["source"] is None
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "llama"]


def test_save_removes_folders_abandoned_by_dead_writers(tmp_path):
    import socket

    _, net, hf_config = _llama_model(tmp_path)
    dead = _dead_pid()
    host = socket.gethostname()
    abandoned = tmp_path / f".ckpt.tmp.{host}.{dead}.0123abcd"
    alive = tmp_path / f".ckpt.tmp.{host}.{os.getpid()}.0123abcd"
    elsewhere = tmp_path / f".ckpt.tmp.other-host.{dead}.0123abcd"
    for path in (abandoned, alive, elsewhere):
        path.mkdir()
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), net, hf_config)
    assert not abandoned.exists() and alive.exists() and elsewhere.exists()


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_convert_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path):
    folder = fixture_copy(tmp_path, "llama")
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a jaxserve checkpoint"):
        convert(str(folder), str(dst))
    assert os.listdir(dst) == ["notes.txt"]
    convert(str(folder), str(tmp_path / "converted"))
    convert(str(folder), str(tmp_path / "converted"))  # a checkpoint is replaced
    assert checkpoint.is_checkpoint(tmp_path / "converted")


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    from models.atomic_files import atomic_write_json

    path = tmp_path / "config.json"
    atomic_write_json(path, {"a": 1})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]
