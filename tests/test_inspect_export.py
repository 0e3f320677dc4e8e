"""`lst inspect`, `lst export --format hdf5` and `lst import`: facts, JSON, a lossless round trip, clear errors."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import zarr
from conftest import assert_user_error, invoke

from featcache import ExtractConfig, LstError, extract, open_store
from featcache import store as S
from featcache.hdf5 import export_hdf5, import_hdf5
from featcache.inspect import inspect_store


@pytest.fixture(scope="module")
def store(tiny_bert, tiny_dataset, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("inspect") / "store.zarr")
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=path, store_dtype="fp16",
                          layers=[0, 2], max_length=16, device="cpu", shard_tokens=256, chunk_tokens=16))
    return path


def set_manifest(path, **changes) -> None:
    group = zarr.open_group(path, mode="r+")
    group.attrs[S.MANIFEST_KEY] = {**group.attrs[S.MANIFEST_KEY], **changes}


def test_inspect_facts(store):
    info = inspect_store(store)
    reader = open_store(store)
    assert info["complete"] and info["shards_done"] == info["shards_total"] > 1
    assert set(info["splits"]) == set(reader.split_names) == {"train", "dev", "test"}
    for name, s in info["splits"].items():
        assert s["examples"] == len(reader.split(name)) and s["tokens"] == reader.split(name).n_tokens
    assert info["layers"] == [0, 2] and info["store_dtype"] == "fp16" and info["hidden_size"] == 32
    assert info["bytes_per_token"] == 2 * 2 * 32  # 2 layers x d=32 x 2 bytes
    # on disk: the values plus shard indexes, chunk padding and the token ids (small, but not nothing)
    assert info["tokens"] * info["bytes_per_token"] <= info["bytes_on_disk"] < 1.5 * info["tokens"] * 128
    assert info["dataset"]["fingerprint"] == reader.manifest["dataset"]["fingerprint"]
    assert info["backbone"]["revision"].startswith("sha256:")


def test_inspect_cli_table_and_json(store):
    r = invoke("inspect", store)
    assert r.exit_code == 0, r.output
    for fragment in ("complete", "train", "dev", "fp16", "bytes per token", "fingerprint"):
        assert fragment in r.output, r.output
    r = invoke("inspect", store, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data == json.loads(json.dumps(inspect_store(store), default=str))
    assert data["splits"]["train"]["shards_done"] == data["splits"]["train"]["shards_total"]


def test_inspect_incomplete_store_and_measured_error(store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    done = zarr.open_group(str(copy), mode="r+")["train/shard_done"]
    done[0] = 0
    fidelity = {"examples": 8, "tokens": 80, "precision": "fp32",
                "storage_error": {"fp16": {"rel_error": 0.000321, "cosine_mean": 0.99999, "cosine_min": 0.9999}}}
    set_manifest(copy, complete=False, fidelity=fidelity)
    info = inspect_store(copy)
    assert not info["complete"] and info["shards_done"] == info["shards_total"] - 1
    assert info["measured_error"]["fidelity"] == fidelity
    r = invoke("inspect", copy)
    assert r.exit_code == 0, r.output
    assert "INCOMPLETE" in r.output and "storage error fp16" in r.output and "0.000321" in r.output
    with pytest.raises(LstError, match="incomplete"):
        export_hdf5(copy, tmp_path / "x.h5")


def test_inspect_errors(store, tmp_path):
    assert_user_error(invoke("inspect", tmp_path / "nope"), "no such path")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("hello")
    assert_user_error(invoke("inspect", other), "not a Zarr group")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w")
    assert_user_error(invoke("inspect", plain), "no manifest")


def test_export_import_round_trip(store, tmp_path):
    h5, back = tmp_path / "store.h5", tmp_path / "back.zarr"
    r = invoke("export", store, "--format", "hdf5", h5)
    assert r.exit_code == 0, r.output
    src = zarr.open_group(store, mode="r")
    with h5py.File(h5, "r") as f:
        assert json.loads(f.attrs["lst_manifest"]) == src.attrs[S.MANIFEST_KEY]
        assert np.array_equal(f["train/hidden"][:], src["train/hidden"][:])
        assert f["train/hidden"].dtype == np.float16
    r = invoke("import", h5, "--out", back)
    assert r.exit_code == 0, r.output
    dst = zarr.open_group(str(back), mode="r")
    assert dst.attrs[S.MANIFEST_KEY] == src.attrs[S.MANIFEST_KEY]
    for split in ("train", "dev", "test"):
        assert sorted(dst[split].array_keys()) == sorted(src[split].array_keys())
        for name in src[split].array_keys():
            a, b = src[split][name], dst[split][name]
            assert (a.dtype, a.shape, a.chunks, a.shards) == (b.dtype, b.shape, b.chunks, b.shards), name
            assert np.array_equal(a[:], b[:]), name
    reread, orig = open_store(back).split("train"), open_store(store).split("train")
    assert reread.reader_kind == "shards"
    assert torch.equal(reread.batch([3, 9, 1]).hidden, orig.batch([3, 9, 1]).hidden)


def test_export_streams_one_shard_at_a_time(store, tmp_path, monkeypatch):
    """Export never reads more than one shard of `hidden` at once (bounded memory for big stores)."""
    shard = zarr.open_group(store, mode="r")["train/hidden"].shards[0]
    largest = []
    original = zarr.Array.__getitem__

    def spy(self, selection):
        out = original(self, selection)
        if self.ndim == 3:
            largest.append(out.shape[0])
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    export_hdf5(store, tmp_path / "s.h5")
    assert largest and max(largest) <= shard < open_store(store).split("train").n_tokens


def test_export_import_errors(store, tmp_path):
    h5 = tmp_path / "out.h5"
    h5.write_bytes(b"not yet")
    assert_user_error(invoke("export", store, h5), "--overwrite")
    assert h5.read_bytes() == b"not yet"  # untouched
    assert invoke("export", store, h5, "--overwrite").exit_code == 0
    assert_user_error(invoke("export", tmp_path / "nope", tmp_path / "a.h5"), "no such path")
    r = invoke("export", store, tmp_path / "b.h5", "--format", "csv")  # typer refuses the choice itself
    assert r.exit_code == 2 and "hdf5" in r.output and not (tmp_path / "b.h5").exists()
    with pytest.raises(LstError, match="--format one of"):
        export_hdf5(store, tmp_path / "b.h5", fmt="csv")
    assert_user_error(invoke("import", tmp_path / "missing.h5", "--out", tmp_path / "s"), "no such file")
    (tmp_path / "text.h5").write_text("hello")
    assert_user_error(invoke("import", tmp_path / "text.h5", "--out", tmp_path / "s"), "not HDF5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    assert_user_error(invoke("import", tmp_path / "foreign.h5", "--out", tmp_path / "s"), "lst_manifest")
    assert invoke("import", h5, "--out", tmp_path / "s").exit_code == 0
    assert_user_error(invoke("import", h5, "--out", tmp_path / "s"), "--overwrite")
    assert invoke("import", h5, "--out", tmp_path / "s", "--overwrite").exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert_user_error(invoke("import", h5, "--out", mine, "--overwrite"), "something else")
    assert (mine / "notes.txt").read_text() == "precious"
    with pytest.raises(LstError, match="no such file"):
        import_hdf5(tmp_path / "gone.h5", tmp_path / "t")


@pytest.fixture(scope="module")
def t5_store(tmp_path_factory) -> str:
    """An encoder-decoder store: nested S/dec groups and a backbone_weights group (a tiny random T5)."""
    from conftest import synthetic_rows, write_tsv
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    from featcache.bundled import minilm_path

    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=16, d_ff=32, d_kv=4, num_layers=1, num_decoder_layers=1,
                      num_heads=4, pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(root / "model")
    write_tsv(root / "data" / "train.tsv", synthetic_rows(16, 1))
    write_tsv(root / "data" / "dev.tsv", synthetic_rows(6, 2))
    out = str(root / "store.zarr")
    extract(ExtractConfig(model=str(root / "model"), dataset=str(root / "data"), out=out, store_dtype="fp16",
                          max_length=16, device="cpu", shard_tokens=64, chunk_tokens=16))
    return out


def all_arrays(path) -> dict[str, zarr.Array]:
    return {p: a for p, a in zarr.open_group(str(path), mode="r").members(max_depth=None) if isinstance(a, zarr.Array)}


def test_encoder_decoder_store_round_trip(t5_store, tmp_path):
    info = inspect_store(t5_store)
    manifest = open_store(t5_store).manifest
    decoder = sum(s.get("decoder_shards", 0) for s in manifest["splits"].values())
    assert decoder > 0 and info["complete"] and info["shards_done"] == info["shards_total"]
    assert info["shards_total"] == decoder + sum(s["shards"] for s in manifest["splits"].values())
    h5, back = tmp_path / "t5.h5", tmp_path / "back.zarr"
    export_hdf5(t5_store, h5)
    import_hdf5(h5, back)
    src, dst = all_arrays(t5_store), all_arrays(back)
    assert "train/dec/hidden" in src and any(p.startswith("backbone_weights/") for p in src)
    assert sorted(src) == sorted(dst)
    for p, a in src.items():
        b = dst[p]
        assert (a.dtype, a.shape, a.shards) == (b.dtype, b.shape, b.shards) and np.array_equal(a[:], b[:]), p
    assert zarr.open_group(str(back), mode="r").attrs[S.MANIFEST_KEY] == manifest
    assert len(open_store(back).split("train")) == manifest["splits"]["train"]["examples"]


def test_kind_and_parts_fall_back_for_older_manifests(store, t5_store):
    """Stores written before `kind` and `parts` were recorded: both come from their older fields."""
    info, t5 = inspect_store(store), inspect_store(t5_store)
    assert info["kind"] == "encoder" and list(info["parts"]) == [""]
    assert info["parts"][""]["layers"] == [0, 2] and info["parts"][""]["bytes_per_token"] == info["bytes_per_token"]
    assert t5["kind"] == "seq2seq" and list(t5["parts"]) == ["", "dec"]
    manifest = open_store(t5_store).manifest
    for name, s in t5["splits"].items():
        facts = manifest["splits"][name]
        assert s["parts"]["dec"]["shards_total"] == facts["decoder_shards"] == s["parts"]["dec"]["shards_done"]
        assert s["parts"]["dec"]["rows"] == facts["decoder_rows"] and s["parts"][""]["rows"] == facts["examples"]
    assert t5["parts"]["dec"]["layers"] == manifest["seq2seq"]["decoder_layers"]
    assert t5["bytes_outside_splits"]["backbone_weights"] > 0


def test_inspect_walks_the_parts_a_manifest_names(store, tmp_path):
    """A kind with a further part (here `extra`, as a later kind might add): listed by `parts`,
    completeness read from S/extra/shard_done, shown by the CLI, copied by export and import."""
    copy = tmp_path / "kinds.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    manifest = dict(group.attrs[S.MANIFEST_KEY])
    extra = group["train"].create_group("extra")
    extra.create_array("hidden", data=np.arange(24, dtype=np.float16).reshape(6, 2, 2))
    extra.create_array("shard_done", data=np.array([1, 0, 1], dtype=np.uint8))
    splits = {}
    for name, facts in manifest["splits"].items():
        parts = {"": {"rows": facts["examples"], "tokens": facts["tokens"], "shards": facts["shards"]}}
        if name == "train":
            parts["extra"] = {"rows": 2, "tokens": 6, "shards": 3}
        splits[name] = {**facts, "parts": parts}
    set_manifest(copy, kind="image", splits=splits,
                 parts={"": {"layers": manifest["layers"], "bytes_per_token": manifest["bytes_per_token"]},
                        "extra": {"layers": [5, 7], "bytes_per_token": 8}})
    info = inspect_store(copy)
    assert info["kind"] == "image" and list(info["parts"]) == ["", "extra"]
    train = info["splits"]["train"]
    assert train["parts"]["extra"]["shards_done"] == 2 and train["parts"]["extra"]["shards_total"] == 3
    assert not train["complete"] and info["shards_done"] == info["shards_total"] - 1
    assert info["parts"]["extra"]["layers"] == [5, 7] and info["parts"]["extra"]["tokens"] == 6
    r = invoke("inspect", copy)
    assert r.exit_code == 0, r.output
    for fragment in ("image", "extra layers", "  extra ", "2 rows", "2/3"):
        assert fragment in r.output, r.output
    group["train/extra/shard_done"][1] = 1
    set_manifest(copy, complete=True)
    assert inspect_store(copy)["splits"]["train"]["complete"]
    h5, back = tmp_path / "kinds.h5", tmp_path / "back.zarr"
    export_hdf5(copy, h5)
    import_hdf5(h5, back)
    src, dst = all_arrays(copy), all_arrays(back)
    assert sorted(src) == sorted(dst) and "train/extra/hidden" in dst
    assert np.array_equal(dst["train/extra/hidden"][:], src["train/extra/hidden"][:])
    keys = ("layers", "bytes_per_token", "rows", "tokens", "shards_done", "shards_total")
    facts = [{p: {k: v[k] for k in keys} for p, v in inspect_store(s)["parts"].items()} for s in (copy, back)]
    assert facts[0] == facts[1]


def test_file_urls_read_like_local_paths(store, tmp_path):
    url = f"file://{store}"
    assert inspect_store(url)["tokens"] == inspect_store(store)["tokens"]
    assert_user_error(invoke("inspect", f"file://{tmp_path / 'nope'}"), "no such path")
    h5 = export_hdf5(url, tmp_path / "u.h5")
    back = f"file://{tmp_path / 'back'}"
    import_hdf5(h5, back)
    assert inspect_store(back)["complete"]
