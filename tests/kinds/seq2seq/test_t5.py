"""Encoder-decoder backbones (T5): extraction ground truth, cached == online, label texts, fp16 refusal.

No T5 weights can be downloaded: a randomly initialised T5 (d=32) built from a config, with the
bundled MiniLM WordPiece tokenizer (pad 0 = decoder start, [SEP] 102 = EOS).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import zarr
from conftest import synthetic_rows, torch_threads, write_tsv

from featcache import ExtractConfig, extract, open_store
from featcache.errors import BackboneError, DatasetError, StoreError, TrainConfigError
from featcache.text.splits import pad_batch
from featcache.text.t5 import label_texts
from sidetrain import TrainConfig, train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):  # tiny matmuls: one thread is ~10x faster than several on a shared, busy CPU
        yield


@pytest.fixture(scope="session")
def t5_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5_data")
    write_tsv(path / "train.tsv", synthetic_rows(40, 1))
    write_tsv(path / "dev.tsv", synthetic_rows(12, 2))
    return path


@pytest.fixture(scope="session")
def t5_store(tiny_t5, t5_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("t5_store") / "store"
    extract(ExtractConfig(model=str(tiny_t5), dataset=str(t5_data), out=str(out), store_dtype="fp32",
                          max_length=16, batch_size=5, device="cpu", shard_tokens=96, chunk_tokens=32))
    return out


def test_manifest_and_layout(t5_store):
    store = open_store(t5_store)
    m = store.manifest
    s = m["seq2seq"]
    assert m["backbone"]["model_type"] == "t5" and m["backbone"]["is_encoder_decoder"]
    assert s["encoder_layers"] == s["decoder_layers"] == [0, 1, 2]
    assert s["label_texts"] == ["class_0", "class_1", "class_2"]  # not GLUE: the label names themselves
    assert all(ids[-1] == 102 for ids in s["candidate_ids"])  # EOS-terminated targets
    assert m["splits"]["train"]["candidates_per_example"] == 1 and m["splits"]["dev"]["candidates_per_example"] == 3
    group = zarr.open_group(str(t5_store), mode="r")
    assert group["backbone_weights/lm_head"].shape == (30522, 32)
    train_cands = group["train/dec/candidates"][:]
    np.testing.assert_array_equal(train_cands, store.split("train").labels)  # gold only on train
    np.testing.assert_array_equal(group["dev/dec/candidates"][:], np.tile([0, 1, 2], 12))  # every candidate on dev
    assert group["train/shard_done"][:].all() and group["dev/dec/shard_done"][:].all()
    fidelity = m["fidelity"]  # measured storage error of encoder and decoder states, as for encoder-only stores
    assert fidelity["storage_error"]["fp32"]["rel_error"] == 0 and fidelity["storage_error"]["bf16"]["rel_error"] < 1e-2
    assert 0 < fidelity["decoder_storage_error"]["bf16"]["rel_error"] < 1e-2


def test_store_equals_fresh_forward(t5_store, tiny_t5):
    """Every stored encoder and decoder state equals a one-example forward; the last one is pre-final-norm."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_t5).eval()
    store = open_store(t5_store)
    s = store.manifest["seq2seq"]
    group = zarr.open_group(str(t5_store), mode="r")
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    texts = [r[0] for r in synthetic_rows(12, 2)]
    split = store.split("dev")
    dec_hidden, dec_off = group["dev/dec/hidden"][:], group["dev/dec/offsets"][:]
    cands = group["dev/dec/candidates"][:]
    with torch.no_grad():
        for i, text in enumerate(texts):
            enc = tok(text, truncation=True, max_length=16, return_tensors="pt")
            got = split.example(i)
            assert got["input_ids"].tolist() == enc["input_ids"][0].tolist()
            for r in range(3 * i, 3 * i + 3):
                target = torch.tensor([s["candidate_ids"][cands[r]]])
                out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=target,
                            output_hidden_states=True)
                for stored, hs, stack in ((got["hidden"], out.encoder_hidden_states, model.encoder),
                                          (torch.from_numpy(dec_hidden[dec_off[r]:dec_off[r + 1]]),
                                           out.decoder_hidden_states, model.decoder)):
                    want = torch.stack(hs[:-1], dim=2)[0]  # (T, L, d): embedding + blocks 1..L-1
                    scale = want.abs().max().item()
                    assert (stored[:, :-1] - want).abs().max().item() <= 1e-5 * scale
                    # transformers' last entry has the final layer norm applied; the store's has not
                    assert not torch.allclose(stored[:, -1], hs[-1][0], atol=1e-3)
                    np.testing.assert_allclose(stack.final_layer_norm(stored[:, -1]), hs[-1][0], rtol=1e-5, atol=1e-5)


def losses(run) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()])


def test_cached_equals_online_with_layer_dropping(t5_store, tmp_path):
    # layer dropping: block 1 has no ladder and no side block
    common = {"store": str(t5_store), "epochs": 3, "batch_size": 8, "seed": 3, "device": "cpu", "dropout": 0.1,
              "reduction_factor": 4, "layers": [2]}
    cached = train(TrainConfig(out=str(tmp_path / "cached"), **common))
    online = train(TrainConfig(out=str(tmp_path / "online"), online=True, **common))
    a, b = losses(tmp_path / "cached"), losses(tmp_path / "online")
    assert len(a) == len(b) == cached["steps"] == 15
    np.testing.assert_allclose(a, b, rtol=1e-4)
    pred_a = json.loads((tmp_path / "cached" / "predictions.json").read_text())
    pred_b = json.loads((tmp_path / "online" / "predictions.json").read_text())
    assert pred_a == pred_b and len(pred_a["dev"]) == 12
    assert cached["splits"]["dev"] == online["splits"]["dev"]
    config = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert config["layers"] == config["decoder_layers"] == [2]


def test_side_network_shapes_and_relative_bias(t5_store):
    from sidetrain.t5.recipe import build_seq2seq_model, store_weights

    store = open_store(t5_store)
    weights = store_weights(store)
    model = build_seq2seq_model(TrainConfig(store="", out="", reduction_factor=4), store.manifest, weights)
    assert model.config.d_model == 8 and model.config.num_heads == 4 and model.config.d_kv == 2
    for part, blocks in (("encoder", model.enc_blocks), ("decoder", model.dec_blocks)):
        table = blocks[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(table, weights[f"{part}_relative_bias"])  # starts from the backbone's
    assert model.lm_head.shape == (30522, 32) and not model.lm_head.requires_grad
    assert "lm_head" not in model.state_dict()  # frozen and in the store: not saved with each run


def test_training_learns_from_the_cache(t5_store, tmp_path):
    summary = train(TrainConfig(store=str(t5_store), out=str(tmp_path / "run"), epochs=12, batch_size=8,
                                lr=1e-2, reduction_factor=4, device="cpu", warmup_steps=0))
    assert summary["history"][-1]["train_loss"] < 0.5 * summary["history"][0]["train_loss"]
    # lst predict's library path: the live backbone on raw text gives the cached evaluation's predictions
    from sidetrain.kinds.seq2seq.predict import load_run, predict_texts

    loaded = load_run(tmp_path / "run")
    texts = [r[0] for r in synthetic_rows(12, 2)]
    live = predict_texts(tmp_path / "run", texts, loaded=loaded)
    cached = json.loads((tmp_path / "run" / "predictions.json").read_text())["dev"]
    assert [int(p["label"][-1]) for p in live] == cached
    # the same through `lst predict` (label per line), and --generate
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--text", texts[0], "--device", "cpu"])
    assert result.exit_code == 0 and result.output.splitlines()[-1] == f"{live[0]['label']}\t{texts[0]}"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--text", texts[0], "--generate",
                                      "--device", "cpu"])
    assert result.exit_code == 0 and result.output.splitlines()[-1].endswith(f"\t{texts[0]}")
    generated = predict_texts(tmp_path / "run", texts[:3], generate=True, max_new_tokens=4, loaded=loaded)
    # greedy generation agrees with the teacher-forced side network on its own output
    from sidetrain.t5.decoding import Encoded, side_logits

    model, backbone, manifest = loaded
    s = manifest["seq2seq"]
    with torch.no_grad():
        for text, g in zip(texts, generated):
            assert g["generated"] and len(g["generated_ids"]) <= 4
            ids, mask = pad_batch([backbone.tokenizer(text)["input_ids"]], 0)
            enc_hidden, enc_out = backbone.encode(ids, mask, s["encoder_layers"])
            enc = Encoded(model.encode(enc_hidden, mask.bool()), mask.bool(), enc_out, mask.bool())
            logits, _ = side_logits(model, backbone, s, [g["generated_ids"]], torch.tensor([0]), enc)
            assert logits[0].argmax(-1).tolist()[:len(g["generated_ids"])] == g["generated_ids"]


def test_label_texts():
    assert label_texts(["0", "1"], "/data/glue/SST-2", None) == ["negative", "positive"]
    assert label_texts(["0", "1"], "/data/glue/CoLA", None) == ["unacceptable", "acceptable"]
    assert label_texts(["entailment", "not_entailment"], "/x/RTE", None) == ["entailment", "not_entailment"]
    assert label_texts(["0", "1"], "/x/mine", None) == ["0", "1"]
    assert label_texts(["0", "1"], "/x/SST-2", {"0": "bad", "1": "good"}) == ["bad", "good"]
    with pytest.raises(DatasetError, match="Expected a text for every label"):
        label_texts(["0", "1"], "/x", {"0": "bad"})


def test_label_text_file_and_fp16(tiny_t5, t5_data, tmp_path, caplog):
    mapping = tmp_path / "labels.json"
    mapping.write_text(json.dumps({"class_0": "card", "class_1": "cash", "class_2": "other"}))
    with caplog.at_level(logging.WARNING):
        m = extract(ExtractConfig(model=str(tiny_t5), dataset=str(t5_data), out=str(tmp_path / "s"), splits=["dev"],
                                  label_text=str(mapping), max_length=16, device="cpu"))  # store dtype: default fp16
    assert m["seq2seq"]["label_texts"] == ["card", "cash", "other"]
    assert m["store_dtype"] == "bf16" and "overflow" in caplog.text
    with pytest.raises(BackboneError, match="Expected --precision fp32 or bf16 for T5. Got fp16"):
        extract(ExtractConfig(model=str(tiny_t5), dataset=str(t5_data), out=str(tmp_path / "s2"), precision="fp16",
                              device="cpu"))


def test_pruned_init(t5_store, tiny_t5, tmp_path):
    """Side blocks start as Fisher-pruned backbone blocks: r = 1 copies them, r = 2 slices them."""
    from featcache.text.t5 import load_seq2seq_backbone
    from sidetrain.t5.prune import fisher_path, fisher_scores, pruned_init
    from sidetrain.t5.recipe import build_seq2seq_model, store_weights

    store = open_store(t5_store)
    backbone = load_seq2seq_backbone(str(tiny_t5), device="cpu")
    scores = fisher_scores(store, backbone, n_examples=16, batch_size=8)
    assert fisher_path(store).exists() and scores["model"].shape == (32,) and scores["decoder.1.ff"].shape == (64,)
    assert scores["decoder.1.layer.1"].gt(0).all()  # cross-attention dims got gradients
    # cached for the same split, count and weights (no backbone needed); another count recomputes
    assert all(torch.equal(v, scores[k]) for k, v in fisher_scores(store, None, n_examples=16).items())
    assert not torch.equal(fisher_scores(store, backbone, n_examples=8, batch_size=8)["model"], scores["model"])
    scores = fisher_scores(store, backbone, n_examples=16, batch_size=8)
    for r in (1, 2):
        side = build_seq2seq_model(TrainConfig(store="", out="", reduction_factor=r, layers=[2]), store.manifest,
                                   store_weights(store))
        pruned_init(side, backbone, scores)
        q = side.dec_blocks[0].layer[1].EncDecAttention.q.weight
        full = backbone.model.decoder.block[1].layer[1].EncDecAttention.q.weight
        if r == 1:
            wo = side.enc_blocks[0].layer[1].DenseReluDense.wo.weight
            assert torch.equal(q, full) and torch.equal(wo, backbone.model.encoder.block[1].layer[1].DenseReluDense.wo.weight)
        else:
            assert q.shape == (16, 16)  # 4 heads x d_kv 4, d_model 16
            model_idx = torch.sort(torch.argsort(scores["model"], descending=True)[:16]).values  # top-16 channels
            per_head = scores["decoder.1.layer.1"].view(4, 8)
            inner = torch.cat([h * 8 + torch.sort(torch.argsort(per_head[h], descending=True)[:4]).values
                               for h in range(4)])  # top half of each head's dims
            assert torch.equal(q, full[inner][:, model_idx])
    summary = train(TrainConfig(store=str(t5_store), out=str(tmp_path / "pruned"), epochs=1, batch_size=8,
                                reduction_factor=4, device="cpu", init="pruned"))
    assert summary["steps"] == 5 and json.loads((tmp_path / "pruned" / "config.json").read_text())["init"] == "pruned"


def test_interrupted_extraction_resumes(tiny_t5, t5_data, t5_store, tmp_path, monkeypatch):
    """A crash mid-extraction leaves unmarked shards; the same command recomputes only those."""
    from featcache import writer

    real, calls = writer._write_shard, []

    def flaky(*args):
        calls.append(args[1:3])
        if len(calls) == 4:
            raise OSError("disk gone")
        real(*args)

    cfg = ExtractConfig(model=str(tiny_t5), dataset=str(t5_data), out=str(tmp_path / "s"), store_dtype="fp32",
                        max_length=16, batch_size=5, device="cpu", shard_tokens=96, chunk_tokens=32)
    monkeypatch.setattr(writer, "_write_shard", flaky)
    with pytest.raises(StoreError, match="disk gone"):  # the shared writer's one-line error (was a raw OSError)
        extract(cfg)
    first = len(calls)
    manifest = extract(cfg)
    shards = sum(s["shards"] + s["decoder_shards"] for s in manifest["splits"].values())
    assert first == 4 and len(calls) - first == shards - 3  # the 3 written shards were not redone
    fresh, resumed = zarr.open_group(str(t5_store), mode="r"), zarr.open_group(str(tmp_path / "s"), mode="r")
    np.testing.assert_array_equal(resumed["dev/dec/target_ids"][:], fresh["dev/dec/target_ids"][:])
    for name in ("train/hidden", "dev/hidden", "train/dec/hidden", "dev/dec/hidden"):
        # the session store may have run with another torch thread count: equal up to float32 rounding
        np.testing.assert_allclose(resumed[name][:], fresh[name][:], rtol=1e-5, atol=1e-5)


def test_batches_read_from_disk_equal_preloaded(t5_store):
    from sidetrain.t5.data import CachedSeq2Seq, open_decoder

    store = open_store(t5_store)
    idx = np.array([7, 2, 3, 11])
    on_disk = CachedSeq2Seq(open_store(t5_store).split("dev"), open_decoder(store, "dev"), preload=False)(idx)
    in_ram = CachedSeq2Seq(store.split("dev"), open_decoder(store, "dev"), preload=True)(idx)
    for name in ("enc_hidden", "enc_mask", "dec_hidden", "dec_mask", "targets", "row_example", "labels"):
        assert torch.equal(getattr(on_disk, name), getattr(in_ram, name)), name
    assert on_disk.dec_hidden.shape[0] == 12 and on_disk.row_example.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_crashed_run_resumes_to_the_uninterrupted_result(t5_store, tmp_path):
    """T5 runs share the encoder loop: a checkpoint each epoch, and a resumed run equals an uninterrupted one."""
    kw = {"store": str(t5_store), "epochs": 3, "batch_size": 8, "reduction_factor": 4, "device": "cpu", "seed": 1}
    full = train(TrainConfig(out=str(tmp_path / "full"), **kw))

    class Crash(Exception):
        pass

    def crash_after_first_epoch(epoch, record):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        train(TrainConfig(out=str(tmp_path / "crashed"), **kw), on_epoch=crash_after_first_epoch)
    trained = []
    resumed = train(TrainConfig(out=str(tmp_path / "crashed"), **kw), on_epoch=lambda e, r: trained.append(e))
    assert trained == [2, 3]  # epoch 1 came from the checkpoint

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]

    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    np.testing.assert_array_equal(losses(tmp_path / "crashed"), losses(tmp_path / "full"))
    assert resumed["splits"] == full["splits"]
    # bf16 autocast (the GPU default) runs the T5 side network too
    amp = train(TrainConfig(out=str(tmp_path / "bf16"), amp="bf16", max_steps=2, **kw))
    assert np.isfinite(amp["history"][-1]["train_loss"])


@pytest.mark.parametrize("flags", [{"top": "last"}, {"label_smoothing": 0.1}])
def test_classifier_only_options_are_refused_for_t5(t5_store, tmp_path, flags):
    with pytest.raises(TrainConfigError, match="--top|--label-smoothing"):
        train(TrainConfig(store=str(t5_store), out=str(tmp_path / "run"), epochs=1, device="cpu", **flags))
