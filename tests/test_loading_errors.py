"""Broken checkpoint directories get errors that name the file and the tensor."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import save_hf_model
from specjax.models.config import UnsupportedModelError
from specjax.models.loading import load_model
from specjax.models.safetensors_io import CheckpointError


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return save_hf_model("llama", str(tmp_path_factory.mktemp("good")))


@pytest.fixture
def broken(good_dir, tmp_path):
    d = str(tmp_path / "ckpt")
    shutil.copytree(good_dir, d)
    return d


def _rewrite_safetensors(path, mutate):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)


def test_good_checkpoint_loads_in_bf16(good_dir):
    model = load_model(good_dir, jnp.bfloat16)
    assert model.params["layers"]["wq"].dtype == jnp.bfloat16
    assert model.params["layers"]["wq"].shape == (2, 64, 64)


def test_sharded_checkpoint_with_index_loads_identically(good_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(os.path.join(good_dir, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(os.path.join(good_dir, "config.json"), d)
    for fn, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / fn))
    index = {"metadata": {}, "weight_map": {k: fn for fn, keys in shards.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = load_model(good_dir, jnp.float32), load_model(str(d), jnp.float32)
    for x, y in zip(np.asarray(a.params["layers"]["w_up"]), np.asarray(b.params["layers"]["w_up"])):
        np.testing.assert_array_equal(x, y)


def test_unknown_model_type(broken):
    cfg_path = os.path.join(broken, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "gpt_neox"
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="gpt_neox.*supported: llama"):
        load_model(broken)


def test_missing_tensor_is_named(broken):
    _rewrite_safetensors(os.path.join(broken, "model.safetensors"),
                         lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(broken)


def test_shape_mismatch_names_file_and_tensor(broken):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8]

    _rewrite_safetensors(os.path.join(broken, "model.safetensors"), shrink)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*k_proj\.weight.*\(8, 64\).*\(32, 64\)"):
        load_model(broken)


def test_truncated_file_is_reported(broken):
    path = os.path.join(broken, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(broken)


def test_garbage_header_is_reported(broken):
    path = os.path.join(broken, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_model(broken)


def test_pickle_weights_are_refused_with_conversion_hint(broken):
    os.remove(os.path.join(broken, "model.safetensors"))
    open(os.path.join(broken, "pytorch_model.bin"), "wb").write(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never unpickles.*save_pretrained"):
        load_model(broken)


def test_missing_config_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path))


def test_sliding_window_is_refused_not_silently_ignored(broken):
    cfg_path = os.path.join(broken, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(model_type="mistral", sliding_window=16)
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UnsupportedModelError, match="sliding_window=16"):
        load_model(broken)


def test_bad_prompts_are_rejected(good_dir):
    from specjax.engine.engine import Engine

    engine = Engine(load_model(good_dir, jnp.float32))
    with pytest.raises(ValueError, match="token id 97 outside the vocab"):
        engine.generate([[1, 2, 97]], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        engine.generate([[1] * 250], max_new_tokens=20)
