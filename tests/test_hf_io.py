"""HF checkpoint I/O: sharded loading on 8 fake devices, export round trips, bf16, refusals and key checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_models import our_logits, padded_batch, torch_logits
from tiny_models import make_tiny_checkpoint

from dpojax.errors import ModelError
from dpojax.models import ModelConfig, abstract_params, export_hf, init_random, load_pretrained
from dpojax.sharding import Sharder, make_mesh


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama", num_kv_heads=2, attention_bias=True)


def flat_params(model):
    return {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_torch(path):
    import torch
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def test_sharded_load_export_round_trip(llama, tmp_path):
    """Load on a (data=1, fsdp=4, tensor=2) mesh: expected shardings, same logits; export; transformers agrees."""
    sharder = Sharder(make_mesh(data=1, fsdp=4, tensor=2))
    model, cfg = load_pretrained(llama, sharder=sharder)
    params = flat_params(model)
    expected = {
        "embed_tokens/embedding": P("tensor", "fsdp"),
        "lm_head/weight": P("tensor", "fsdp"),
        "layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor", None),
        "layers/self_attn/k_proj/kernel": P(None, "fsdp", "tensor", None),
        "layers/self_attn/q_proj/bias": P(None, "tensor", None),
        "layers/self_attn/o_proj/kernel": P(None, "tensor", None, "fsdp"),
        "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
        "layers/input_layernorm/weight": P(None, None),
        "norm/weight": P(None),
    }
    for path, spec in expected.items():
        assert params[path].sharding.spec == spec, path
        assert params[path].sharding.mesh == sharder.mesh
    ids, pos, seg = padded_batch()
    ref_model, _ = load_pretrained(llama)
    ours = our_logits(model, ids, pos, seg)
    np.testing.assert_allclose(ours, our_logits(ref_model, ids, pos, seg), atol=1e-5)

    out = export_hf(model, cfg, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    load_torch(out)  # no missing / unexpected keys
    real = seg > 0
    np.testing.assert_allclose(torch_logits(out, ids, seg)[real], ours[real], atol=1e-4, rtol=0)


def test_tied_export_and_shards(tmp_path):
    """A tied model exports without lm_head; small max_shard_bytes writes an index that both loaders read."""
    from safetensors import safe_open

    path = make_tiny_checkpoint(tmp_path / "qwen3", "qwen3", tie=True, head_dim=16)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "generation_config.json").write_text('{"eos_token_id": 2}')
    model, cfg = load_pretrained(path)
    out = export_hf(model, cfg, tmp_path / "export", tokenizer_dir=tok, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert "lm_head.weight" not in index["weight_map"]
    for file in files:
        with safe_open(str(out / file), framework="numpy") as f:
            assert all(index["weight_map"][k] == file for k in f.keys())
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()

    reloaded, cfg2 = load_pretrained(out)  # sharded checkpoint via index.json
    assert cfg2 == cfg
    ids, pos, seg = padded_batch()
    ours = our_logits(model, ids, pos, seg)
    np.testing.assert_allclose(our_logits(reloaded, ids, pos, seg), ours, atol=1e-6)
    load_torch(out)
    real = seg > 0
    np.testing.assert_allclose(torch_logits(out, ids, seg)[real], ours[real], atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_and_exports(llama, tmp_path):
    import torch
    import transformers

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
    torch_model.save_pretrained(tmp_path / "bf16")
    model, cfg = load_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    q_LxDxHxDh = flat_params(model)["layers/self_attn/q_proj/kernel"]
    assert q_LxDxHxDh.dtype == jnp.bfloat16
    ref = torch_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*Dh, D]
    np.testing.assert_array_equal(np.asarray(q_LxDxHxDh[1], np.float32).reshape(32, -1).T, ref)
    up32, _ = load_pretrained(tmp_path / "bf16", param_dtype=jnp.float32)  # upcast on load
    assert flat_params(up32)["norm/weight"].dtype == jnp.float32
    out = export_hf(model, cfg, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again, _ = load_pretrained(out, param_dtype=jnp.bfloat16)
    jax.tree.map(np.testing.assert_array_equal, flat_params(again), flat_params(model))


def test_missing_and_unmapped_weights_are_named(llama, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(llama, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.layers\.0\.mlp\.extra"):
        load_pretrained(bad)
    shutil.copy(llama / "model.safetensors", bad / "model.safetensors")
    config = json.loads((llama / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ModelError, match=r"mlp.*shape \(\d+, \d+\), expected .*48.*disagree"):
        load_pretrained(bad)


def test_pickle_only_folder_is_refused(llama, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((llama / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ModelError, match="pytorch_model.bin.*never unpickles.*safetensors"):
        load_pretrained(folder)
    with pytest.raises(ModelError, match="not a folder"):
        load_pretrained(str(tmp_path / "does-not-exist"))


def test_init_random_is_sharded_and_deterministic(llama):
    sharder = Sharder(make_mesh(data=2, fsdp=2, tensor=2))
    cfg = ModelConfig.from_hf(json.loads((llama / "config.json").read_text()))
    a, b = init_random(cfg, seed=3, sharder=sharder), init_random(cfg, seed=3, sharder=sharder)
    c = init_random(cfg, seed=4, sharder=sharder)  # same compiled initializer
    pa, pb, pc = flat_params(a), flat_params(b), flat_params(c)
    assert pa["layers/mlp/gate_proj/kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert pa["layers/mlp/gate_proj/kernel"].shape == (2, 32, 64)
    assert float(jnp.std(pa["layers/mlp/gate_proj/kernel"])) == pytest.approx(0.02, rel=0.2)
    np.testing.assert_array_equal(pa["layers/post_attention_layernorm/weight"], 1.0)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    assert not np.array_equal(pa["embed_tokens/embedding"], pc["embed_tokens/embedding"])
    assert set(pa) == set(flat_params(load_pretrained(llama)[0]))
    _, abstract = abstract_params(cfg, sharder=sharder)
    for path, var in nnx.to_flat_state(abstract):
        key = "/".join(map(str, path))
        assert (var.shape, var.dtype, var.get_value().sharding) == (pa[key].shape, pa[key].dtype, pa[key].sharding), key
