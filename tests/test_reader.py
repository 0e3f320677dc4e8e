"""The public reader API: examples and batches equal the stored arrays, whichever way they are read."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import zarr

from featcache import ExtractConfig, LstError, extract, open_store
from featcache import store as S
from featcache.text.backbone import load_backbone

# small shards (64 tokens) and inner chunks (8) so that examples straddle shard boundaries
LAYOUT = {"shard_tokens": 64, "chunk_tokens": 8, "max_length": 16, "device": "cpu", "batch_size": 16}
# fp32 is the ground truth; fp16 a 2-byte dtype; int8 adds its scales array (bf16 reads like fp16: 2-byte bits)
DTYPES = [d for d in ("fp32", "fp16", "int8") if d in S.STORE_DTYPES]


@pytest.fixture(scope="module")
def stores(tiny_bert, tiny_dataset, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("reader_stores")
    backbone = load_backbone(str(tiny_bert), device="cpu")  # loaded once for every dtype
    out = {}
    for dtype in DTYPES:
        path = str(root / f"{dtype}.zarr")
        extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=path, splits=["train", "dev"],
                              store_dtype=dtype, **LAYOUT), backbone=backbone)
        out[dtype] = path
    return out


def stored_rows(path: str, split: str, lo: int, hi: int) -> torch.Tensor:
    """Ground truth, read with plain zarr-python and decoded: (hi - lo, n_layers, d) float32."""
    g = zarr.open_group(path, mode="r")[split]
    dtype = zarr.open_group(path, mode="r").attrs[S.MANIFEST_KEY]["store_dtype"]
    scales = g["scales"][lo:hi] if "scales" in g else None
    return S.decode(g["hidden"][lo:hi], dtype, scales) if scales is not None else S.decode(g["hidden"][lo:hi], dtype)


def test_examples_equal_stored_arrays(stores):
    path = stores["fp32"]
    split = open_store(path).split("train")
    assert split.reader_kind == "shards"  # local, uncompressed: memory-mapped
    g = zarr.open_group(path, mode="r")["train"]
    offsets, ids, labels = g["offsets"][:], g["input_ids"][:], g["labels"][:]
    assert g["hidden"].shards[0] == 64 and split.n_tokens > 4 * 64  # several shards
    for i in range(len(split)):
        ex = split.example(i)
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        assert torch.equal(ex["hidden"], stored_rows(path, "train", lo, hi))
        assert ex["input_ids"].tolist() == ids[lo:hi].tolist()
        assert int(ex["label"]) == int(labels[i])
    assert torch.equal(split[3]["hidden"], split.example(3)["hidden"])


def test_batch_values_mask_and_padding(stores):
    path = stores["fp32"]
    split = open_store(path).split("train")
    idx = [7, 0, 42, 119, 64]
    b = split.batch(idx)
    lengths = split.lengths[idx]
    assert b.hidden.shape == (5, lengths.max(), len(split.layers), split.manifest["hidden_size"])
    assert b.mask.sum(1).tolist() == lengths.tolist()
    for r, i in enumerate(idx):
        n = int(lengths[r])
        lo = int(split.offsets[i])
        assert torch.equal(b.hidden[r, :n], stored_rows(path, "train", lo, lo + n))
        assert not b.hidden[r, n:].any()  # padding is zero
        assert b.input_ids[r, :n].tolist() == split.input_ids[lo:lo + n].tolist()
    assert b.labels.tolist() == split.labels[idx].tolist()


def test_layer_selection(stores):
    split = open_store(stores["fp32"]).split("dev")
    full = split.batch(range(10))
    picked = split.batch(range(10), layers=[2, 0])
    assert torch.equal(picked.hidden, full.hidden[:, :, [2, 0]])
    assert torch.equal(split.example(4, layers=[1])["hidden"], split.example(4)["hidden"][:, [1]])
    with pytest.raises(LstError, match="stored layers"):
        split.batch([0], layers=[7])


@pytest.mark.parametrize("dtype", DTYPES)
def test_bulk_reader_equals_per_example_and_zarr(stores, dtype):
    """Memory-mapped shards, zarr-python and a split loaded in RAM give the same batches."""
    mapped = open_store(stores[dtype]).split("train")
    via_zarr = open_store(stores[dtype], reader="zarr").split("train")
    in_ram = open_store(stores[dtype]).split("train").load()
    assert (mapped.reader_kind, via_zarr.reader_kind, in_ram.reader_kind) == ("shards", "zarr", "memory")
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.choice(len(mapped), 12, replace=False)
        a, b, c = mapped.batch(idx, layers=[0, 2]), via_zarr.batch(idx, layers=[0, 2]), in_ram.batch(idx, layers=[0, 2])
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.hidden, c.hidden)
        for r, i in enumerate(idx):
            ex = mapped.example(int(i), layers=[0, 2])["hidden"]
            assert torch.equal(a.hidden[r, :len(ex)], ex)
    if dtype == "int8":  # values really are rescaled, not raw int8 codes
        assert via_zarr.example(0)["hidden"].abs().max() < 64


def test_batches_cover_split_once(stores):
    split = open_store(stores["fp16"]).split("dev")
    seen = []
    for b in split.batches(7, shuffle=True, seed=1):
        seen += b.labels.tolist()
        assert b.hidden.shape[0] <= 7
    assert sorted(seen) == sorted(split.labels.tolist())
    def order(seed: int) -> list[int]:
        return [t for b in split.batches(7, seed=seed) for t in b.input_ids[:, 1].tolist()]

    assert order(1) == order(1) != order(2)  # seeded


def test_bad_indices_and_reader(stores):
    split = open_store(stores["fp16"]).split("dev")
    with pytest.raises(LstError, match="example index"):
        split.example(len(split))
    with pytest.raises(LstError, match="indices"):
        split.batch([0, len(split)])
    with pytest.raises(LstError, match="reader one of"):
        open_store(stores["fp16"], reader="fast")


def test_remote_store_falls_back_to_zarr(stores):
    """A store that cannot be memory-mapped (fsspec/memory) reads through zarr, with the same values."""
    pytest.importorskip("fsspec")
    src = zarr.open_group(stores["fp16"], mode="r")
    url = "memory://reader-test/store.zarr"
    dst = zarr.open_group(url, mode="w")
    for split in ("train", "dev"):
        for name in src[split].array_keys():
            a = src[split][name]
            dst.require_group(split).create_array(name, data=a[:], chunks=a.chunks, shards=a.shards)
    dst.attrs[S.MANIFEST_KEY] = src.attrs[S.MANIFEST_KEY]
    remote, local = open_store(url).split("dev"), open_store(stores["fp16"]).split("dev")
    assert remote.reader_kind == "zarr"
    assert torch.equal(remote.batch([5, 1, 9]).hidden, local.batch([5, 1, 9]).hidden)


def test_unexpected_shard_layout_reads_through_zarr(stores, tmp_path):
    """A shard whose chunks are not laid out in order (here: an all-zero chunk zarr leaves out) is read by zarr."""
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(stores["fp16"], copy)
    hidden = zarr.open_group(str(copy), mode="r+")["train/hidden"]
    hidden[8:16] = 0  # the second inner chunk of shard 0 becomes fill value, dropped from the shard file
    rows = hidden.shards[0]  # as if written so: its checksum follows (a legitimately sparse shard)
    zarr.open_group(str(copy), mode="r+")["train/shard_crc"][0] = zlib.crc32(np.ascontiguousarray(hidden[:rows]))
    split = open_store(copy).split("train")
    everything = split.stored_rows(np.array([0]), np.array([split.n_tokens]))
    assert np.array_equal(everything, hidden[:])
    assert 0 not in split._hidden._shards.mapped and 1 in split._hidden._shards.mapped
    assert torch.equal(split.batch([0, 1, 2]).hidden, open_store(copy, reader="zarr").split("train").batch([0, 1, 2]).hidden)


@pytest.mark.parametrize("dtype", [*DTYPES, "bf16"])
def test_split_held_on_the_device_gives_the_same_batches(stores, dtype, tiny_bert, tiny_dataset, tmp_path,
                                                         monkeypatch):
    """DeviceBatches (a GPU's --preload) gathers and decodes on the device what the host reader gives.
    Run on the CPU here: the same torch code, the device only changes where the tensors live."""
    from sidetrain.data import CachedBatches, DeviceBatches

    path = stores.get(dtype)
    if path is None:  # bf16: stored as uint16 bits, viewed as bfloat16 on the device
        path = str(tmp_path / "bf16.zarr")
        extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=path, splits=["train"],
                              store_dtype=dtype, **LAYOUT))
    monkeypatch.setattr(DeviceBatches, "COPY_TOKENS", 37)  # several copy chunks, not aligned with examples
    split = open_store(path).split("train")
    for layers in (None, [0, 2]):
        host, device = CachedBatches(split, layers, preload=False), DeviceBatches(split, layers, torch.device("cpu"))
        for idx in ([0], [5, 1, 9, 3], list(range(len(split)))):
            a, b = host(np.array(idx)), device(np.array(idx))
            assert torch.equal(a.hidden, b.hidden) and torch.equal(a.mask, b.mask)
            assert torch.equal(a.labels, b.labels) and torch.equal(a.input_ids, b.input_ids)


def test_parts_columns_and_frozen_weights_of_a_t5_store(tmp_path):
    """Stage 2 reads every part of a store through the reader: T5's decoder rows (memory-mapped, equal
    to zarr's bytes), their columns, and the frozen weights, without opening Zarr itself."""
    from conftest import synthetic_rows, write_tsv
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    model = tmp_path / "t5"
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=30522, d_model=16, d_ff=32, d_kv=4, num_layers=1,
                                        num_decoder_layers=1, num_heads=4, pad_token_id=0, eos_token_id=102,
                                        decoder_start_token_id=0)).save_pretrained(model)
    from featcache.bundled import minilm_path

    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model)
    write_tsv(tmp_path / "data" / "train.tsv", synthetic_rows(12, 1))
    write_tsv(tmp_path / "data" / "dev.tsv", synthetic_rows(6, 2))
    out = tmp_path / "store"
    extract(ExtractConfig(model=str(model), dataset=str(tmp_path / "data"), out=str(out), store_dtype="fp32",
                          max_length=12, device="cpu", shard_tokens=32, chunk_tokens=8, error_sample=0))
    store = open_store(out)
    dev = store.split("dev").part("dec")
    g = zarr.open_group(str(out), mode="r")["dev"]["dec"]
    assert dev.reader_kind == "shards" and len(dev) == 6 * 3
    np.testing.assert_array_equal(dev.column("candidates"), g["candidates"][:])
    lo, hi = dev.offsets[[4, 0]], dev.offsets[[5, 1]]
    want = np.concatenate([g["hidden"][a:b] for a, b in zip(lo, hi)])
    np.testing.assert_array_equal(dev.hidden_rows(lo, hi).numpy(), want)
    weights = store.frozen_weights()
    assert sorted(weights) == ["decoder_relative_bias", "encoder_relative_bias", "lm_head"]
    assert weights["lm_head"].shape == (30522, 16)
    with pytest.raises(LstError, match="part 'nope'"):
        store.split("dev").part("nope")
    with pytest.raises(LstError, match="array 'nope'"):
        dev.column("nope")
    assert open_store(out).split("train").column("labels").shape == (12,)
