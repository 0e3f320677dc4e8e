"""Every stored hidden state equals a fresh forward pass at the real (unpadded) token positions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from featcache import ExtractConfig, extract, open_store

TOLERANCE = {"fp32": 0.0, "fp16": 1e-3, "bf16": 8e-3}  # relative to the value's magnitude


def fresh_states(model_dir, texts: list[str], max_length: int) -> list[torch.Tensor]:
    """(T, L+1, d) per text, one text at a time: no padding anywhere."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states
            out.append(torch.stack(hs, dim=2)[0])
    return out


def check_store(store_path, model_dir, dataset_dir, split: str, dtype: str, max_length: int) -> None:
    import pandas as pd

    texts = pd.read_csv(dataset_dir / f"{split}.tsv", sep="\t")["text"].astype(str).tolist()
    reader = open_store(store_path).split(split)
    assert len(reader) == len(texts)
    expected = fresh_states(model_dir, texts, max_length)
    for i, want in enumerate(expected):
        got = reader.example(i)["hidden"]
        assert got.shape == want.shape, f"example {i}: {got.shape} != {want.shape}"
        err = (got - want).abs().max().item()
        scale = want.abs().max().item()
        if dtype == "fp32":
            # a batched, padded forward may reorder float sums: exact up to float32 rounding
            assert err <= 1e-5 * scale, f"example {i}: max error {err}"
        else:
            assert err <= TOLERANCE[dtype] * scale * 4, f"example {i}: max error {err} ({dtype})"


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_tiny_bert_store_equals_fresh_forward(tiny_bert, tiny_dataset, tmp_path, dtype):
    out = tmp_path / "store"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(out), store_dtype=dtype,
                          max_length=16, batch_size=7, device="cpu", shard_tokens=128, chunk_tokens=32))
    for split in ("train", "dev"):
        check_store(out, tiny_bert, tiny_dataset, split, dtype, max_length=16)


def test_minilm_store_equals_fresh_forward(minilm, banking_small, tmp_path):
    out = tmp_path / "store"
    manifest = extract(ExtractConfig(model=str(minilm), dataset=str(banking_small), out=str(out), store_dtype="fp32",
                                     max_length=32, batch_size=16, device="cpu", splits=["dev"]))
    assert manifest["layers"] == list(range(7)) and manifest["hidden_size"] == 384
    check_store(out, minilm, banking_small, "dev", "fp32", max_length=32)


def test_input_ids_and_labels_are_stored(tiny_bert, tiny_dataset, tmp_path):
    import pandas as pd

    out = tmp_path / "store"
    manifest = extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(out), device="cpu",
                                     max_length=16))
    frame = pd.read_csv(tiny_dataset / "train.tsv", sep="\t")
    names = manifest["task"]["label_names"]
    assert names == ["class_0", "class_1", "class_2"]
    split = open_store(out).split("train")
    assert [names[i] for i in split.labels] == frame["label"].tolist()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    first = tok(frame["text"][0], truncation=True, max_length=16)["input_ids"]
    assert split.example(0)["input_ids"].tolist() == first
