"""Nothing silently wrong: every shard's bytes are checksummed when written and verified when read.
A missing, zeroed, bit-flipped, truncated or index-corrupted shard is a one-line error naming the
shard, never zeros or a raw traceback; `verify_group` names every bad shard, and re-running the same
extraction recomputes exactly those."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from featcache import ExtractConfig, extract, open_store
from featcache import writer as W
from featcache.errors import StoreError
from featcache.verify import verify_group

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(model, data, out, **kw) -> ExtractConfig:
    return ExtractConfig(model=str(model), dataset=str(data), out=str(out), max_length=16, batch_size=8,
                         device="cpu", shard_tokens=64, chunk_tokens=16, error_sample=0, **kw)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def good_store(request, tiny_bert, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"good_{request.param}") / "store"
    extract(settings(tiny_bert, tiny_dataset, out, store_dtype=request.param))
    return out


def shard_file(store, part: str, k: int):
    return store / part / "hidden" / "c" / str(k) / "0" / "0"


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "missing":
        path.unlink()
        return
    if how == "zeroed":
        data[:len(data) // 2] = bytes(len(data) // 2)
    elif how == "bitflip":
        data[37] ^= 0x10
    elif how == "truncated":
        data = data[:len(data) // 3]
    elif how == "index":  # the shard index (offsets, sizes and its own crc32c) sits at the end
        data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def read_everything(store):
    s = open_store(store)
    for name in s.split_names:
        split = s.split(name)
        split.batch(np.arange(len(split)))


@pytest.mark.parametrize("how", ["missing", "zeroed", "bitflip", "truncated", "index"])
def test_a_damaged_shard_is_an_error_naming_it(good_store, tmp_path, how):
    copy = tmp_path / "copy"
    shutil.copytree(good_store, copy)
    damage(shard_file(copy, "train", 1), how)
    read_everything(good_store)  # the original is fine
    with pytest.raises(StoreError, match=r"Shard 1 of 'train' is damaged: .*lst inspect STORE --verify") as err:
        read_everything(copy)
    assert "\n" not in str(err.value)
    if how == "missing":
        assert "its file is missing" in str(err.value)
    report = verify_group(zarr.open_group(str(copy), mode="r"), open_store(copy).manifest, show=False)
    assert [(b["part"], b["shard"]) for b in report["bad"]] == [("train", 1)]


def test_verify_names_every_bad_shard_and_extract_recomputes_exactly_those(tiny_bert, tiny_dataset, tmp_path,
                                                                              monkeypatch):
    store = tmp_path / "s"
    extract(settings(tiny_bert, tiny_dataset, store, store_dtype="fp16"))
    reference = {n: zarr.open_group(str(store), mode="r")[n]["hidden"][:] for n in ("train", "dev", "test")}
    damage(shard_file(store, "train", 0), "bitflip")
    damage(shard_file(store, "dev", 0), "missing")
    report = verify_group(zarr.open_group(str(store), mode="r"), open_store(store).manifest, show=False)
    assert sorted((b["part"], b["shard"]) for b in report["bad"]) == [("dev", 0), ("train", 0)]
    assert report["checked"] == sum(s["shards"] for s in open_store(store).manifest["splits"].values())
    real, calls = W._write_shard, []

    def record(g, k, *args):
        calls.append((g.path, k))
        real(g, k, *args)

    monkeypatch.setattr(W, "_write_shard", record)
    assert extract(settings(tiny_bert, tiny_dataset, store, store_dtype="fp16"))["complete"]
    assert sorted(calls) == [("dev", 0), ("train", 0)]  # only the damaged shards were recomputed
    read_everything(store)
    for name, values in reference.items():
        assert np.array_equal(zarr.open_group(str(store), mode="r")[name]["hidden"][:], values), name
    calls.clear()
    assert extract(settings(tiny_bert, tiny_dataset, store, store_dtype="fp16"))["complete"]
    assert calls == []  # a sound complete store: verified, nothing recomputed


def test_stores_without_checksums_still_read(good_store, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(good_store, copy)
    for name in ("train", "dev", "test"):
        shutil.rmtree(copy / name / "shard_crc")
    read_everything(copy)
    report = verify_group(zarr.open_group(str(copy), mode="r"), open_store(copy).manifest, show=False)
    assert report["checked"] == 0 and sorted(report["without_checksums"]) == ["dev", "test", "train"]


def test_inspect_verify_names_bad_shards_in_one_line_each(good_store, tmp_path):
    from conftest import invoke

    copy = tmp_path / "copy"
    shutil.copytree(good_store, copy)
    r = invoke("inspect", copy, "--verify")
    assert r.exit_code == 0 and "0 bad" in r.output, r.output
    damage(shard_file(copy, "dev", 0), "zeroed")
    r = invoke("inspect", copy, "--verify")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "bad shard dev #0: checksum mismatch" in r.output and "1 bad" in r.output
