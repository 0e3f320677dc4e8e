"""Decoder-only backbones through the frozen LM head: label texts scored by their log-likelihood (--label-text) and
free-text targets (--task generate), the target states and the frozen top against a fresh forward, cached ==
online for every task type, live scoring and generation (KV-cached == recomputed each step, the cache's exact
match == live greedy generation's), and the bad inputs. Tiny random causal LMs built from configs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, assert_user_error, invoke, synthetic_rows, torch_threads, write_tsv
from test_decoder import save_causal_lm

from featcache import ExtractConfig, extract, open_store
from sidetrain import LadderModel, TrainConfig, train

LABEL_TEXTS = {"class_0": "card", "class_1": "fee cash", "class_2": "pin"}
TARGET_FAMILIES = ("llama", "gpt2", "qwen2")  # rotary + RMSNorm, learned positions + LayerNorm, sliding window


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    return {f: save_causal_lm(root / f, f) for f in TARGET_FAMILIES}


def generation_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Free-text targets a small side network learns in a few steps: one of two texts, by the prompt's first word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        rows.append((" ".join(words), "fee" if words[0] < "l" else "pin card"))
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("target_data")
    write_tsv(root / "labels" / "train.tsv", synthetic_rows(24, 1))
    write_tsv(root / "labels" / "dev.tsv", synthetic_rows(8, 2))
    (root / "label_text.json").write_text(json.dumps(LABEL_TEXTS))
    write_tsv(root / "text" / "train.tsv", generation_rows(32, 3), header=("text", "target"))
    write_tsv(root / "text" / "dev.tsv", generation_rows(12, 4), header=("text", "target"))
    return {"labels": root / "labels", "label_text": root / "label_text.json", "text": root / "text"}


def extract_targets(model: Path, dataset: Path, out: Path, label_text: Path | None = None, **kw) -> Path:
    cfg = ExtractConfig(model=str(model), dataset=str(dataset), out=str(out), max_length=56, batch_size=8,
                        device="cpu", store_dtype="fp32", shard_tokens=256, chunk_tokens=32,
                        label_text=None if label_text is None else str(label_text),
                        task="generate" if label_text is None else "auto", **kw)  # free text without label texts
    extract(cfg)
    return out


@pytest.fixture(scope="module")
def stores(lms, data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("target_stores")
    return {"labels-llama": extract_targets(lms["llama"], data["labels"], root / "ll", data["label_text"]),
            "labels-gpt2": extract_targets(lms["gpt2"], data["labels"], root / "lg", data["label_text"]),
            "text-qwen2": extract_targets(lms["qwen2"], data["text"], root / "tq"),
            "text-llama": extract_targets(lms["llama"], data["text"], root / "tl")}


def run_options(store: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"store": str(store), "out": str(out), "epochs": 1, "batch_size": 8, "seed": 3,
                          "device": "cpu", "dropout": 0.1, "reduction_factor": 2, "top": "last", **kw})


@pytest.fixture(scope="module")
def runs(stores, tmp_path_factory) -> dict[str, Path]:
    """One short run per target store (the live model's tests)."""
    root = tmp_path_factory.mktemp("target_runs")
    for name, store in stores.items():
        train(run_options(store, root / name, layers=[1, 3]))
    return {name: root / name for name in stores}


def losses(run: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()])


# ---------------------------------------------------------------- stage 1

def test_a_label_store_holds_target_states_and_the_frozen_top_of_a_fresh_forward(stores, lms):
    """Train: the gold label's text after each prompt; dev: every candidate. Each stored target state equals the
    causal LM's forward of prompt + target (fp32), and the stored final norm + LM head give the LM's own logits."""
    from transformers import AutoModelForCausalLM

    from featcache.kinds.decoder.lm_head import lm_logits

    store = open_store(stores["labels-llama"])
    targets = store.manifest["decoder"]["targets"]
    assert targets["mode"] == "labels" and targets["label_texts"] == list(LABEL_TEXTS.values())
    assert store.manifest["splits"]["train"]["targets_per_example"] == 1
    assert store.manifest["splits"]["dev"]["targets_per_example"] == 3
    weights = {k: torch.from_numpy(v) for k, v in store.frozen_weights().items()}
    lm = AutoModelForCausalLM.from_pretrained(lms["llama"]).eval()
    dev, train_split = store.split("dev"), store.split("train")
    tgt = dev.part("tgt")
    ids = tgt.column("target_ids")
    for row in (0, 4, 8):  # example row // 3, candidate row % 3
        example = dev.example(row // 3)
        lo, hi = int(tgt.offsets[row]), int(tgt.offsets[row + 1])
        target = ids[lo:hi].tolist()
        assert target == targets["candidate_ids"][row % 3] and target[-1] == targets["eos_token_id"]
        seq = torch.tensor([example["input_ids"].tolist() + target])
        with torch.no_grad():
            out = lm(input_ids=seq, output_hidden_states=True)
        p = len(example["input_ids"])
        stored = tgt.hidden_rows(np.array([lo]), np.array([hi]))  # (U, 4, d)
        want = torch.stack(out.hidden_states[:-1], dim=2)[0, p:]  # (U, 3, d): embedding + blocks 0..1
        torch.testing.assert_close(stored[:, :-1], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm_logits(stored[:, -1], weights), out.logits[0, p:], rtol=1e-4, atol=1e-4)
    gold = train_split.part("tgt").column("candidates")
    np.testing.assert_array_equal(gold, train_split.labels)


# ---------------------------------------------------------------- stage 2: cached == online

@pytest.mark.parametrize("name", ["labels-llama", "labels-gpt2", "text-qwen2"])
def test_cached_training_equals_online_through_the_lm_head(name, stores, tmp_path):
    """From an fp32 store or with the causal backbone live: the same losses, predictions and scores (block 2 dropped,
    QST's gate at the top)."""
    cached = train(run_options(stores[name], tmp_path / "c", epochs=2, layers=[1, 3]))
    online = train(run_options(stores[name], tmp_path / "o", epochs=2, layers=[1, 3], online=True))
    a, b = losses(tmp_path / "c"), losses(tmp_path / "o")
    assert len(a) == len(b) == cached["steps"] > 0
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert a[0] > 0 and np.isfinite(a).all()
    preds = [json.loads((tmp_path / r / "predictions.json").read_text()) for r in ("c", "o")]
    assert preds[0] == preds[1] and cached["splits"] == online["splits"]
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["store_manifest"]["decoder"]["targets"]["mode"] == name.split("-")[0]


def test_regression_cached_training_equals_online(lms, tmp_path):
    data = tmp_path / "reg"
    rows = [(t, f"{len(t.split()) / 3:.2f}") for t, _ in synthetic_rows(24, 5)]
    write_tsv(data / "train.tsv", rows[:16])
    write_tsv(data / "dev.tsv", rows[16:])
    store = tmp_path / "s"
    extract(ExtractConfig(model=str(lms["gpt2"]), dataset=str(data), out=str(store), max_length=16, batch_size=8,
                          device="cpu", store_dtype="fp32"))
    cached = train(run_options(store, tmp_path / "c", epochs=2))
    online = train(run_options(store, tmp_path / "o", epochs=2, online=True))
    np.testing.assert_allclose(losses(tmp_path / "c"), losses(tmp_path / "o"), rtol=1e-4)
    assert cached["splits"]["dev"]["pearson"] == pytest.approx(online["splits"]["dev"]["pearson"], abs=1e-5)


# ---------------------------------------------------------------- live: scoring and generation

def test_live_label_scores_equal_the_cache_and_predict_prints_labels(runs, stores, data):
    """The live backbone + side network give the run's own predictions from the store; `lst predict` prints the
    labels, `--generate` free text."""
    run = runs["labels-llama"]
    model = LadderModel.from_pretrained(run, device="cpu")
    assert type(model).__name__ == "DecoderLMLadderModel" and model.can_generate()
    texts = [t for t, _ in synthetic_rows(8, 2)]
    scores = model.logits(texts)
    assert scores.shape == (8, 3) and (scores < 0).all()
    stored = json.loads((run / "predictions.json").read_text())["dev"]
    assert model.predict(texts) == [model.label_names[i] for i in stored]
    result = invoke("predict", run, "--text", texts[0], "--text", texts[1])
    assert result.exit_code == 0, result.output
    assert [x.split("\t")[0] for x in result.output.splitlines() if x.strip()] == model.predict(texts[:2])
    result = invoke("predict", run, "--text", texts[0], "--generate")
    assert result.exit_code == 0, result.output
    assert result.output.split("\t")[0] == model.generate_texts(texts[:1])[0]


def test_gate_on_the_backbone_gives_the_lms_own_next_token_logits(runs, lms):
    """With g = 1 the top is the backbone's last state alone: final norm + LM head must be the LM's own."""
    from transformers import AutoModelForCausalLM

    model = LadderModel.from_pretrained(runs["labels-gpt2"], device="cpu")
    with torch.no_grad():
        model.side.gate.fill_(50.0)
    inputs = model.preprocess(["card fee cash pin", "lost"])
    lm = AutoModelForCausalLM.from_pretrained(lms["gpt2"]).eval()
    with torch.no_grad():
        want = lm(**inputs).logits
        got = model(**inputs, labels=inputs["input_ids"])
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got.logits[mask], want[mask], rtol=1e-4, atol=1e-4)
    assert got.loss is not None and torch.isfinite(got.loss)


@pytest.mark.parametrize("name", ["labels-llama", "labels-gpt2", "text-qwen2"])
def test_kv_cached_generation_equals_recomputing_the_sequence(name, runs):
    """Greedy decoding with the backbone's and the side network's KV caches gives, step by step, the logits of
    recomputing the whole sequence (qwen2: a sliding window shorter than the prompts)."""
    model = LadderModel.from_pretrained(runs[name], device="cpu")
    layers = model.manifest["layers"]
    prompt = model.tokenize(["card fee cash pin lost stolen top up limit"])[0]
    seq = list(prompt)
    b_cache, s_cache, new = model.causal.new_cache(), model.side.new_cache(), list(prompt)
    with torch.no_grad():
        for _ in range(6):
            hidden = model.causal.step(torch.tensor([new]), b_cache, layers)
            at = torch.zeros(hidden.shape[:2], dtype=torch.bool)
            at[0, -1] = True
            cached = model.side.logits(model.side(hidden, torch.ones(1, len(seq), dtype=torch.bool), at, cache=s_cache))
            full_hidden, mask = model.states([seq])
            at_full = torch.zeros_like(mask)
            at_full[0, -1] = True
            full = model.side.logits(model.side(full_hidden, mask, at_full))
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
            new = [int(full.argmax())]
            seq += new
    inputs = model.preprocess(["card fee", "pin lost stolen top"])
    made = model.generate(**inputs, max_new_tokens=8)
    assert torch.equal(made, model.generate(**inputs, max_new_tokens=8, use_cache=False))
    assert made[0, :2].tolist() == inputs["input_ids"][0, :2].tolist() and made.shape[1] >= 4 + 1


def test_free_text_exact_match_from_the_cache_is_live_greedy_generations(stores, data, tmp_path):
    """Accuracy from the cache is teacher-forced exact match, which is what greedy generation with the backbone live
    reproduces: the same examples right, and some of them (the run learnt something)."""
    run = tmp_path / "run"
    result = train(run_options(stores["text-llama"], run, epochs=10, lr=1e-2, dropout=0.0, top="side",
                               warmup_steps=0))
    dev = [line.split("\t") for line in (data["text"] / "dev.tsv").read_text().splitlines()[1:]]
    model = LadderModel.from_pretrained(run, device="cpu")
    generated = model.predict([p for p, _ in dev])
    exact = [int(g == t) for g, (_, t) in zip(generated, dev)]
    assert json.loads((run / "predictions.json").read_text())["dev"] == exact
    assert result["splits"]["dev"]["accuracy"] == pytest.approx(np.mean(exact)) and sum(exact) >= 3
    assert open_store(stores["text-llama"]).manifest["task"]["type"] == "generate"


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_are_one_line_errors(lms, data, runs, stores, tmp_path):
    from transformers import AutoModel

    # a checkpoint without its LM head (a saved base model; Llama's head is not tied to the embeddings)
    base = tmp_path / "base"
    AutoModel.from_pretrained(lms["llama"]).save_pretrained(base)
    (base / "config.json").write_text((lms["llama"] / "config.json").read_text())  # a *ForCausalLM config
    for f in lms["llama"].glob("*token*"):
        (base / f.name).write_text(f.read_text())
    lt = data["label_text"]
    assert_user_error(invoke("extract", base, data["labels"], "--out", tmp_path / "a", "--label-text", lt,
                             "--max-length", 56), "with its LM head")
    # a prompt longer than --max-length: refused, not cut (at extraction and at prediction)
    assert_user_error(invoke("extract", lms["llama"], data["labels"], "--out", tmp_path / "b", "--label-text", lt,
                             "--max-length", 8), "prompts within --max-length 8")
    assert_user_error(invoke("predict", runs["labels-llama"], "--text", " ".join(["card"] * 80)),
                      "prompts of 1..56 tokens")
    # an empty target, a label without a text
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**LABEL_TEXTS, "class_1": ""}))
    assert_user_error(invoke("extract", lms["gpt2"], data["labels"], "--out", tmp_path / "c", "--label-text", empty,
                             "--max-length", 56), "non-empty target")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"class_0": "card"}))
    assert_user_error(invoke("extract", lms["gpt2"], data["labels"], "--out", tmp_path / "d", "--label-text", partial,
                          "--max-length", 56), "a text for every label")
    assert_user_error(invoke("train", stores["labels-gpt2"], "--out", tmp_path / "e", "--label-smoothing", "0.1"),
                      "--label-smoothing 0")


def test_task_generate_is_refused_for_a_kind_without_free_text_targets(tiny_bert, data, tmp_path):
    from conftest import assert_user_error, invoke

    result = invoke("extract", str(tiny_bert), str(data["text"]), "--out", str(tmp_path / "s"), "--task", "generate",
                    "--device", "cpu")
    assert_user_error(result, "--task generate only for a backbone whose kind trains free-text targets", "decoder")
    assert not (tmp_path / "s").exists()
