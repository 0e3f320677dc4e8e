"""Decoder-only backbones (causal LMs): detection, extraction ground truth for several families, cached == online,
lst predict, the refusals, kill -9 and resume. No LLM weights can be downloaded: tiny random models built from
configs (Llama, Qwen2, Mistral, GPT-2), with a byte-level BPE tokenizer trained here that has no pad token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, assert_user_error, invoke, synthetic_rows, torch_threads, write_tsv

from featcache import ExtractConfig, extract, open_store
from featcache.kinds import kind_for_request
from sidetrain import TrainConfig, train

ROOT = Path(__file__).resolve().parents[3]
FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def bpe_tokenizer():
    """A byte-level BPE (GPT-2 style) over the synthetic words: no pad token, like most causal LM tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 4 + WORDS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def family_config(family: str, vocab: int):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "eos_token_id": 0, "bos_token_id": 0}
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":  # sliding window on the last layer: the side block beside it slides too
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=6)
    return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=64, eos_token_id=0,
                      bos_token_id=0)


def save_causal_lm(path: Path, family: str) -> Path:
    """A random *ForCausalLM of the family (the usual hub checkpoint: base model + LM head) with the tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family_config(family, len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def causal_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal")
    return {f: save_causal_lm(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="session")
def dec_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dec_data")
    write_tsv(path / "train.tsv", synthetic_rows(40, 1))
    write_tsv(path / "dev.tsv", synthetic_rows(12, 2))
    return path


def extract_store(model: Path, data: Path, out: Path, **kw) -> Path:
    extract(ExtractConfig(model=str(model), dataset=str(data), out=str(out), max_length=16, batch_size=5,
                          device="cpu", **{"store_dtype": "fp32", "shard_tokens": 96, "chunk_tokens": 32, **kw}))
    return out


@pytest.fixture(scope="session")
def dec_stores(causal_models, dec_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dec_stores")
    return {f: extract_store(causal_models[f], dec_data, root / f) for f in FAMILIES}


# ---------------------------------------------------------------- stage 1

def test_causal_lms_are_detected_as_decoders_and_encoders_are_not(causal_models, tiny_bert):
    from transformers import AutoConfig

    cfg = ExtractConfig(model="x", dataset="y", out="z")
    for family, path in causal_models.items():
        assert kind_for_request(cfg, AutoConfig.from_pretrained(path)).name == "decoder", family
    # BERT has a causal-LM class too (BertLMHeadModel), but it is a masked-LM family: still an encoder
    assert kind_for_request(cfg, AutoConfig.from_pretrained(tiny_bert)).name == "encoder"


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_states_equal_a_fresh_forward(family, causal_models, dec_stores, dec_data):
    """Every stored state equals a one-example forward of the causal LM (exact in fp32, padding never leaks into
    a real token); the last layer is the last block's output before the final norm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = open_store(dec_stores[family])
    m = store.manifest
    assert m["kind"] == "decoder" and m["layers"] == [0, 1, 2, 3] and m["tokenizer"]["pad_token_id"] in (None, 0)
    lm = AutoModelForCausalLM.from_pretrained(causal_models[family]).eval()
    tok = AutoTokenizer.from_pretrained(causal_models[family])
    split = store.split("dev")
    base = lm.base_model
    final_norm = base.ln_f if family == "gpt2" else base.norm
    with torch.no_grad():
        for i, (text, _) in enumerate(synthetic_rows(12, 2)):
            enc = tok(text, truncation=True, max_length=16, return_tensors="pt")
            got = split.example(i)
            assert got["input_ids"].tolist() == enc["input_ids"][0].tolist()
            hs = lm(**enc, output_hidden_states=True).hidden_states
            want = torch.stack(hs[:-1], dim=2)[0]  # (T, 3, d): embedding output + blocks 0..1
            scale = want.abs().max().item()
            assert (got["hidden"][:, :-1] - want).abs().max().item() <= 1e-5 * scale
            torch.testing.assert_close(final_norm(got["hidden"][:, -1]), hs[-1][0], rtol=1e-5, atol=1e-5)


def test_dry_run_sizes_the_store_and_layers_keep_it_down(causal_models, dec_data, tmp_path):
    llama = causal_models["llama"]
    full = invoke("extract", llama, dec_data, "--out", tmp_path / "a", "--dry-run", "--max-length", 16)
    some = invoke("extract", llama, dec_data, "--out", tmp_path / "b", "--dry-run", "--max-length", 16,
                  "--layers", "0,3")
    assert full.exit_code == 0 and some.exit_code == 0, full.output + some.output
    assert not (tmp_path / "a").exists()

    def size(out: str) -> float:
        import re

        found = re.search(r"([\d.]+) (KB|MB|GB|kB|KiB|MiB|GiB|B)\b", out)
        assert found, out
        return float(found.group(1)) * {"B": 1, "KB": 1e3, "kB": 1e3, "KiB": 1024, "MB": 1e6, "MiB": 2**20,
                                         "GB": 1e9, "GiB": 2**30}[found.group(2)]

    assert size(some.output) < size(full.output)


def test_bf16_store_and_bf16_backbone_record_their_error(causal_models, dec_data, tmp_path):
    out = extract_store(causal_models["qwen2"], dec_data, tmp_path / "s", store_dtype="bf16", precision="bf16",
                        layers=[0, 2, 3])
    m = open_store(out).manifest
    assert m["layers"] == [0, 2, 3] and m["store_dtype"] == "bf16" and m["precision"] == "bf16"
    drift = m["fidelity"]["precision_drift"]["rel_error"]
    assert 0 < drift < 0.05  # against the fp32 causal backbone, pre-final-norm on both sides


def test_hdf5_export_and_import_round_trip(dec_stores, tmp_path):
    from featcache.hdf5 import export_hdf5, import_hdf5

    h5 = export_hdf5(dec_stores["gpt2"], tmp_path / "s.h5")
    import_hdf5(h5, tmp_path / "back")
    a, b = open_store(dec_stores["gpt2"]).split("dev"), open_store(tmp_path / "back").split("dev")
    assert open_store(tmp_path / "back").manifest["kind"] == "decoder"
    np.testing.assert_array_equal(a.example(3)["hidden"].numpy(), b.example(3)["hidden"].numpy())


def test_bad_inputs_are_one_line_errors(causal_models, dec_data, tmp_path):
    gpt2 = causal_models["gpt2"]  # 64 learned positions: a longer example cannot be run
    long = write_tsv(tmp_path / "long" / "train.tsv", [(" ".join(["card"] * 90), "a"), ("fee", "b")]).parent
    assert_user_error(invoke("extract", gpt2, long, "--out", tmp_path / "a", "--max-length", 100),
                      "examples within the backbone's 64 positions", "Use --max-length 64 or less")
    assert_user_error(invoke("extract", gpt2, dec_data, "--out", tmp_path / "b", "--layers", "0,7", "--max-length", 16),
                      "--layers within 0..3")


def test_kill_minus_9_then_resume_gives_the_same_store(causal_models, dec_data, dec_stores, tmp_path):
    """A real kill -9 mid-way leaves a store that never reads back as whole; re-running resumes to the same states."""
    from featcache.errors import StoreError

    out = tmp_path / "store"
    code = ("import time; from featcache import ExtractConfig, extract\n"
            "import featcache.kinds.decoder.backbone as b\n"
            "orig = b.CausalBackbone.hidden_states\n"
            "def slow(self, *a, **k):\n    time.sleep(0.15); return orig(self, *a, **k)\n"
            "b.CausalBackbone.hidden_states = slow\n"
            f"extract(ExtractConfig(model={str(causal_models['mistral'])!r}, dataset={str(dec_data)!r}, "
            f"out={str(out)!r}, max_length=16, batch_size=5, device='cpu', store_dtype='fp32', shard_tokens=96, "
            "chunk_tokens=32))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def done() -> int:
        return sum(1 for p in out.glob("*/shard_done/c/*") if p.is_file())

    deadline = time.time() + 60
    while time.time() < deadline and done() < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reference = open_store(dec_stores["mistral"])
    total = sum(-(-reference.split(n).n_tokens // 96) for n in ("train", "dev"))
    assert 2 <= done() < total  # really killed mid-way
    with pytest.raises(StoreError, match="incomplete|manifest"):
        open_store(out)
    extract_store(causal_models["mistral"], dec_data, out)
    resumed = open_store(out)
    for name in ("train", "dev"):
        for i in range(len(reference.split(name))):
            np.testing.assert_array_equal(reference.split(name).example(i)["hidden"].numpy(),
                                          resumed.split(name).example(i)["hidden"].numpy())


# ---------------------------------------------------------------- stage 2

def losses(run: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()])


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_training_equals_online(family, dec_stores, tmp_path):
    """From an fp32 store or with the causal backbone live: the same losses, predictions and scores; block 2 dropped
    (no ladder, no side block), the --top gate on the last token's stored state."""
    common = {"store": str(dec_stores[family]), "epochs": 2, "batch_size": 8, "seed": 3, "device": "cpu",
              "dropout": 0.1, "reduction_factor": 2, "layers": [1, 3], "top": "last"}
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    online = train(TrainConfig(out=str(tmp_path / "online"), online=True, **common))
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "online")
    assert len(a) == len(b) == cached["steps"] == 10
    np.testing.assert_allclose(a, b, rtol=1e-4)
    pred_a = json.loads((tmp_path / "cached" / "predictions.json").read_text())
    pred_b = json.loads((tmp_path / "online" / "predictions.json").read_text())
    assert pred_a == pred_b and len(pred_a["dev"]) == 12
    assert cached["splits"]["dev"] == online["splits"]["dev"]
    config = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert config["layers"] == [1, 3] and config["side_pooling"] == "last"


def test_side_blocks_are_the_familys_own_at_1_over_r(dec_stores):
    from transformers import Qwen2Model

    from featcache.reader import open_store as op
    from sidetrain.kinds.decoder.recipe import build_model

    model = build_model(TrainConfig(store="x", out="y", reduction_factor=2, layers=[1, 3]), op(dec_stores["qwen2"]).manifest)
    assert isinstance(model.side, Qwen2Model) and len(model.blocks) == 2
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 4, 2)
    assert cfg.intermediate_size == 32 and cfg.layer_types == ["full_attention", "sliding_attention"]
    # causal: a token's output never depends on later tokens
    hidden, mask = torch.randn(2, 6, 4, 32), torch.ones(2, 6, dtype=torch.bool)
    model.eval()
    short = model(hidden[:, :4], mask[:, :4])
    padded = model(torch.cat([hidden[:, :4], torch.zeros(2, 2, 4, 32)], 1), mask & (torch.arange(6) < 4))
    torch.testing.assert_close(short, padded, rtol=1e-5, atol=1e-5)


def test_regression_trains_from_the_last_token(causal_models, tmp_path):
    data = tmp_path / "reg"
    rows = [(t, f"{len(t.split()) / 3:.2f}") for t, _ in synthetic_rows(24, 5)]
    write_tsv(data / "train.tsv", rows[:16])
    write_tsv(data / "dev.tsv", rows[16:])
    store = extract_store(causal_models["llama"], data, tmp_path / "s")
    result = train(TrainConfig(store=str(store), out=str(tmp_path / "run"), epochs=2, batch_size=8, device="cpu",
                               reduction_factor=4))
    assert open_store(store).manifest["task"]["type"] == "regression" and "pearson" in result["splits"]["dev"]


def test_predict_on_raw_text_and_ladder_model(dec_stores, tmp_path):
    from sidetrain import LadderModel

    run = tmp_path / "run"
    train(TrainConfig(store=str(dec_stores["gpt2"]), out=str(run), epochs=1, batch_size=8, device="cpu",
                      reduction_factor=2, top="last"))
    texts = [t for t, _ in synthetic_rows(12, 2)]
    result = invoke("predict", run, "--text", texts[0], "--text", texts[1])
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 2 and all(x.startswith("class_") for x in lines), result.output
    model = LadderModel.from_pretrained(run, device="cpu")
    assert type(model).__name__ == "DecoderLadderModel"
    # the live backbone + side network reproduce the run's own predictions from the store
    stored = json.loads((run / "predictions.json").read_text())["dev"]
    names = open_store(dec_stores["gpt2"]).manifest["task"]["label_names"]
    assert model.predict(texts) == [names[i] for i in stored]
    out = model(**model.preprocess(texts[:3]))
    assert out.logits.shape == (3, 3)
    saved = model.save_pretrained(tmp_path / "saved")
    assert LadderModel.from_pretrained(saved, device="cpu").predict(texts[:4]) == model.predict(texts[:4])


def test_what_is_not_built_is_refused_in_one_line(dec_stores, tmp_path):
    store = dec_stores["llama"]
    out = tmp_path / "r"
    assert_user_error(invoke("train", store, "--out", out, "--init", "pruned"), "--init random")
    assert_user_error(invoke("train", store, "--out", out, "--pooling", "cls"), "last real token")
    assert_user_error(invoke("train", store, "--out", out, "--reduction-factor", "3"), "--reduction-factor")
    run = tmp_path / "ok"
    train(TrainConfig(store=str(store), out=str(run), epochs=1, batch_size=16, device="cpu", reduction_factor=2))
    assert_user_error(invoke("predict", run, "--text", "card fee", "--generate"), "generates text")
    assert_user_error(invoke("train", store, "--out", tmp_path / "p", "--head", "probe"))


def test_sweep_runs_one_trial_at_a_time_and_refuses_stacking(dec_stores, tmp_path):
    store = dec_stores["mistral"]
    result = invoke("sweep", store, "--out", tmp_path / "sw", "--trials", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sw" / "summary.json").is_file()
    assert_user_error(invoke("sweep", store, "--out", tmp_path / "sw2", "--trials", 2, "--stack", 2),
                      "--stack 1")
