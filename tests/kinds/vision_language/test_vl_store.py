"""Vision-language stores, stage 1 (#13): one stored row per distinct image, the text part equal to the encoder
kind's, the images part equal to the image kind's (tiny ViT and the bundled EfficientNet-Lite0), the shared
writer's guarantees (resume after kill -9, dtypes, HDF5, torchrun), bad inputs as one line, easy_vqa_dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import assert_user_error, draw, invoke, torch_threads

from featcache import ExtractConfig, extract, open_store
from featcache.errors import BackboneError

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def questions(images: list[tuple[str, str, str]]) -> list[dict]:
    """Three questions per (path cell, colour, shape)."""
    rows = []
    for cell, colour, shape in images:
        rows += [{"question": "what color is the shape?", "answer": colour, "image": cell},
                 {"question": "what shape is in the image?", "answer": shape, "image": cell},
                 {"question": f"is there a {shape}?", "answer": "yes", "image": cell}]
    return rows


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> Path:
    """DATA/{train,dev}.jsonl whose images sit beside DATA (pics/), named by relative, dotted and absolute paths:
    train has 6 questions over 2 images (one named two ways), dev 6 questions over 2 images."""
    root = tmp_path_factory.mktemp("vqa")
    pics = root / "pics"
    a, b = draw(pics / "a.png", "red", "circle"), draw(pics / "b.png", "blue", "rectangle")
    c = draw(pics / "c.png", "green", "circle")
    data = root / "data"
    train = questions([("../pics/a.png", "red", "circle"), ("../pics/b.png", "blue", "rectangle")])
    train[3]["image"] = str(b)  # the same file by its absolute path: still one stored image
    train[4]["image"] = "../pics/./b.png"
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "dev.jsonl", questions([(str(c), "green", "circle"), ("../pics/a.png", "red", "circle")]))
    del a
    return data


def vl_config(model, image_model, data, out, **kw) -> ExtractConfig:
    kw = {"store_dtype": "fp32", "batch_size": 4, "device": "cpu", "error_sample": 2, "max_length": 16, **kw}
    return ExtractConfig(model=str(model), dataset=str(data), out=str(out), image_model=str(image_model), **kw)


@pytest.fixture(scope="module")
def vl_store(tiny_bert, tiny_vit, vqa, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vl_store") / "store"
    with torch_threads(1):
        extract(vl_config(tiny_bert, tiny_vit, vqa, out))
    return out


def test_one_stored_row_per_distinct_image(vl_store, tiny_bert, tiny_vit, vqa):
    store = open_store(vl_store)
    m = store.manifest
    assert m["kind"] == "vision_language"
    train, dev = store.split("train"), store.split("dev")
    assert len(train) == 6 and len(train.part("images")) == 2 and len(dev.part("images")) == 2
    assert train.column("image_index").tolist() == [0, 0, 0, 1, 1, 1]
    assert dev.column("image_index").tolist() == [0, 0, 0, 1, 1, 1]
    assert train.part("images").n_tokens == 2 * 17 and train.part("images").offsets.tolist() == [0, 17, 34]
    images = zarr.open_group(str(vl_store), mode="r")["train/images"]
    assert images["hidden"].shape == (34, 1, 32)  # one stored layer: the ViT's last hidden_states entry
    assert images["input_ids"][:].tolist() == list(range(17)) * 2 and not images["token_type_ids"][:].any()
    assert m["vision_language"]["images"] == {"train": 2, "dev": 2}
    assert m["vision_language"]["questions"] == {"train": 6, "dev": 6}
    assert m["vision_language"]["image_column"] == "image" and m["parts"]["images"]["layers"] == [2]
    assert m["task"]["label_names"] == ["blue", "circle", "green", "rectangle", "red", "yes"]
    assert m["backbone"]["name"] == str(Path(tiny_bert).resolve()) and m["backbone"]["model_type"] == "bert"
    assert m["image_backbone"]["name"] == str(Path(tiny_vit).resolve())
    assert m["image_backbone"]["revision"].startswith("sha256:") and m["image_backbone"]["model_type"] == "vit"
    assert m["image"]["tokens"] == 17 and m["image"]["family"] == "transformer"
    for key in ("model", "revision", "image_model", "image_revision", "dataset_fingerprint", "image_fingerprint",
                "layers", "columns", "image_column"):
        assert key in m["request"], key
    assert m["dataset"]["image_fingerprint"] == m["request"]["image_fingerprint"]
    assert m["fidelity"]["storage_error"]["fp16"]["rel_error"] < 1e-3  # the text part's, as the encoder kind
    assert m["fidelity"]["image"]["storage_error"]["fp16"]["rel_error"] < 1e-3


def test_text_part_equals_the_encoder_kind(vl_store, tiny_bert, vqa, tmp_path):
    text = tmp_path / "text"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(vqa), out=str(text), store_dtype="fp32", batch_size=4,
                          device="cpu", error_sample=2, max_length=16, label_column="answer"))
    a, b = zarr.open_group(str(vl_store), mode="r"), zarr.open_group(str(text), mode="r")
    assert b.attrs["lst"]["kind"] == "encoder"
    for split in ("train", "dev"):
        for name in ("hidden", "offsets", "input_ids", "token_type_ids", "labels"):
            np.testing.assert_array_equal(a[split][name][:], b[split][name][:], err_msg=f"{split}/{name}")
    assert a.attrs["lst"]["fidelity"]["storage_error"] == b.attrs["lst"]["fidelity"]["storage_error"]


def image_kind_table(out: Path, cells: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.csv").write_text("image\n" + "".join(f"{c}\n" for c in cells))
    return out


def test_images_part_equals_the_image_kind(vl_store, tiny_bert, tiny_vit, vqa, tmp_path):
    """The tiny ViT (its last layer) and the bundled EfficientNet-Lite0 (the image kind's default stages)."""
    pics = (vqa.parent / "pics").resolve()
    table = image_kind_table(tmp_path / "table", [str(pics / "a.png"), str(pics / "b.png")])
    extract(ExtractConfig(model=str(tiny_vit), dataset=str(table), out=str(tmp_path / "vit"), store_dtype="fp32",
                          batch_size=4, device="cpu", error_sample=0, layers=[2]))
    vl = zarr.open_group(str(vl_store), mode="r")["train/images/hidden"][:]
    np.testing.assert_array_equal(vl, zarr.open_group(str(tmp_path / "vit"), mode="r")["train/hidden"][:])

    one = tmp_path / "one"  # the CNN on one question per image (a 224 px forward is the slow part)
    write_jsonl(one / "train.jsonl", [{"question": "what color is it?", "answer": c, "image": str(pics / f"{n}.png")}
                                      for n, c in (("a", "red"), ("b", "blue"))])
    extract(vl_config(tiny_bert, "efficientnet-lite0", one, tmp_path / "vl_cnn", error_sample=0))
    extract(ExtractConfig(model="efficientnet-lite0", dataset=str(table), out=str(tmp_path / "cnn"),
                          store_dtype="fp32", batch_size=4, device="cpu", error_sample=0))
    a, b = zarr.open_group(str(tmp_path / "vl_cnn"), mode="r"), zarr.open_group(str(tmp_path / "cnn"), mode="r")
    assert a["train/images/hidden"].shape == (2 * 49, 1, 2096)  # all nine stages pooled to 7 x 7, concatenated
    np.testing.assert_array_equal(a["train/images/hidden"][:], b["train/hidden"][:])
    assert a.attrs["lst"]["image"] == b.attrs["lst"]["image"]


def test_kind_is_chosen_by_image_model(tiny_bert, tiny_vit):
    from transformers import AutoConfig, T5Config

    from featcache.kinds import kind_for_request

    bert = AutoConfig.from_pretrained(tiny_bert)
    plain = ExtractConfig(model="m", dataset="d", out="o", image_column="image")
    assert kind_for_request(plain, bert).name == "image"  # an image column alone: the image kind, as before
    for config in (bert, T5Config(), None):  # --image-model wins over the image column and the backbone type
        assert kind_for_request(ExtractConfig(model="m", dataset="d", out="o", image_model="x",
                                              image_column="image"), config).name == "vision_language"


def test_store_dtypes_hdf5_and_inspect(vl_store, tiny_bert, tiny_vit, vqa, tmp_path):
    """int8 and bf16 through the shared writer (both parts), HDF5 round trip, lst inspect --verify."""
    from featcache.hdf5 import export_hdf5, import_hdf5

    fp32 = open_store(vl_store)
    for dtype, tol in (("int8", 2e-2), ("bf16", 4e-3)):
        out = tmp_path / dtype
        extract(vl_config(tiny_bert, tiny_vit, vqa, out, store_dtype=dtype, error_sample=0))
        store = open_store(out)
        assert store.manifest["store_dtype"] == dtype
        for part in ("", "images"):
            a = fp32.split("train") if not part else fp32.split("train").part(part)
            b = store.split("train") if not part else store.split("train").part(part)
            lo, hi = a.offsets[:-1], a.offsets[1:]
            x, y = a.hidden_rows(lo, hi), b.hidden_rows(lo, hi)
            assert float((x - y).norm() / x.norm()) < tol, (dtype, part)
        if dtype == "int8":
            assert "scales" in zarr.open_group(str(out), mode="r")["train/images"]
    h5 = export_hdf5(vl_store, tmp_path / "vl.h5")
    import_hdf5(h5, tmp_path / "back")
    a, b = zarr.open_group(str(vl_store), mode="r"), zarr.open_group(str(tmp_path / "back"), mode="r")
    for name in ("train/hidden", "train/image_index", "train/images/hidden", "dev/images/offsets"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert open_store(tmp_path / "back").manifest["kind"] == "vision_language"
    result = invoke("inspect", vl_store, "--verify")
    assert result.exit_code == 0, result.output
    assert "vision_language" in result.output and "images" in result.output and "0 bad" in result.output


def test_dry_run_counts_the_images_part(tiny_bert, vqa, tmp_path):
    summary = extract(vl_config(tiny_bert, "efficientnet-lite0", vqa, tmp_path / "dry", dry_run=True,
                                store_dtype="fp16"))["preflight"]
    assert not (tmp_path / "dry").exists()
    assert summary["splits"]["train"]["parts"]["images"] == {"rows": 2, "tokens": 98, "shards": 1}
    assert summary["bytes"] == sum(s["tokens"] for s in summary["splits"].values()) * 3 * 32 * 2 + 4 * 49 * 2096 * 2


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, writer
    model, image_model, data, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    if delay:
        real = writer._write_shard
        def slow(*args):
            time.sleep(delay)
            real(*args)
        writer._write_shard = slow
    extract(ExtractConfig(model=model, image_model=image_model, dataset=data, out=out, batch_size=3, device="cpu",
                          store_dtype="fp32", shard_tokens=34, chunk_tokens=17, error_sample=2, max_length=16))
""")


def test_resume_after_kill_9_equals_an_uninterrupted_run(tiny_bert, tiny_vit, vqa, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LST_IMAGE_THREADS": "2",
           "HF_HUB_OFFLINE": "1"}

    def child(out: Path, delay: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(tiny_bert), str(tiny_vit), str(vqa), str(out),
                                 str(delay)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extract(vl_config(tiny_bert, tiny_vit, vqa, whole, batch_size=3, shard_tokens=34, chunk_tokens=17))  # 1 thread
    shards = sum(s["shards"] for s in zarr.open_group(str(whole), mode="r").attrs["lst"]["splits"].values())
    parts = sum(len(s["parts"]) for s in zarr.open_group(str(whole), mode="r").attrs["lst"]["splits"].values())
    assert shards >= 4 and parts == 4
    proc = child(killed, 0.3)
    deadline = time.time() + 90
    while time.time() < deadline and sum(1 for _ in killed.glob("**/shard_done/c/*")) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not zarr.open_group(str(killed), mode="r").attrs["lst"]["complete"]
    assert child(killed, 0).wait(120) == 0
    a, b = zarr.open_group(str(whole), mode="r"), zarr.open_group(str(killed), mode="r")
    for split in ("train", "dev"):
        for name in ("hidden", "image_index", "labels", "images/hidden", "images/offsets"):
            assert np.array_equal(a[split][name][:], b[split][name][:]), f"{split}/{name}"
    assert open_store(killed).manifest["complete"]


def test_resume_refuses_another_image_model(tiny_bert, tiny_vit, vqa, tmp_path):
    out = tmp_path / "s"
    extract(vl_config(tiny_bert, tiny_vit, vqa, out, error_sample=0))
    result = invoke("extract", tiny_bert, vqa, "--image-model", "efficientnet-lite0", "--out", out,
                    "--store-dtype", "fp32", "--max-length", 16, "--error-sample", 0, "--device", "cpu")
    assert_user_error(result, "image_model", "image_revision", "--overwrite")


def test_changed_images_are_refused_on_resume_and_online(tiny_bert, tiny_vit, vqa, tmp_path):
    import shutil

    from featcache.errors import StoreError
    from featcache.kinds.vision_language.kind import store_images

    data = tmp_path / "copy" / "data"
    shutil.copytree(vqa.parent, data.parent)
    out = tmp_path / "s"
    extract(vl_config(tiny_bert, tiny_vit, data, out, error_sample=0))
    found = store_images(open_store(out).manifest)  # what stage 2's --online re-lists
    # relative cells now name the copies, absolute ones still the originals: train uses 3 files
    assert [len(found[s].items) for s in ("train", "dev")] == [3, 2]
    assert found["train"].image_index.tolist() == [0, 0, 0, 1, 2, 2]
    draw(data.parent / "pics" / "a.png", "green", "rectangle")  # same path, other pixels
    with pytest.raises(StoreError, match="image_fingerprint"):
        extract(vl_config(tiny_bert, tiny_vit, data, out, error_sample=0))
    with pytest.raises(StoreError, match="changed"):
        store_images(open_store(out).manifest)


def test_bad_inputs_are_one_line_errors(tiny_bert, tiny_vit, vqa, tmp_path):
    gone = tmp_path / "gone"
    rows = questions([(str((vqa.parent / "pics" / "a.png").resolve()), "red", "circle"),
                      (str(tmp_path / "missing.png"), "blue", "circle")])
    write_jsonl(gone / "train.jsonl", rows)
    result = invoke("extract", tiny_bert, gone, "--image-model", tiny_vit, "--out", tmp_path / "o1")
    assert_user_error(result, "split 'train', row 3", "missing.png", "no such file")
    result = invoke("extract", tiny_bert, vqa, "--image-model", tiny_vit, "--image-column", "picture",
                    "--out", tmp_path / "o2")
    assert_user_error(result, "'picture'", "question", "answer", "image")
    result = invoke("extract", tiny_bert, vqa, "--image-model", tiny_bert, "--out", tmp_path / "o3")
    assert_user_error(result, "--image-model an image model", "BertConfig")
    result = invoke("extract", tiny_bert, vqa, "--image-model", tmp_path / "nowhere", "--out", tmp_path / "o4")
    assert_user_error(result, "nowhere")
    result = invoke("extract", "efficientnet-lite0", vqa, "--image-model", tiny_vit, "--out", tmp_path / "o4")
    assert_user_error(result, "text backbone as MODEL")  # the two models swapped
    bad = tmp_path / "bad"
    (bad / "x.png").parent.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"not a png")
    write_jsonl(bad / "train.jsonl", questions([("x.png", "red", "circle")]))
    result = invoke("extract", tiny_bert, bad, "--image-model", tiny_vit, "--out", tmp_path / "o5")
    assert_user_error(result, "split 'train', row 0", "x.png", "decode")
    assert not any((tmp_path / f"o{i}").exists() and any((tmp_path / f"o{i}").iterdir()) for i in range(1, 6))


def test_an_encoder_decoder_other_than_t5_beside_an_image_model_is_refused(vqa, tmp_path):
    """T5 beside an image model is the VL-T5 store (test_vl_t5.py); other encoder-decoders have no side network."""
    from transformers import AutoTokenizer, BartConfig, BartModel

    from featcache.bundled import minilm_path

    bart = tmp_path / "bart"
    BartModel(BartConfig(vocab_size=30522, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16)).save_pretrained(bart)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(bart)
    with pytest.raises(BackboneError, match="a T5 as the encoder-decoder text backbone"):
        extract(vl_config(bart, "efficientnet-lite0", vqa, tmp_path / "o"))


def test_easy_vqa_dataset_writes_disjoint_splits_of_the_asked_size(tmp_path):
    import easy_vqa

    from featcache.bundled import easy_vqa_dataset
    from featcache.errors import LstError

    out = easy_vqa_dataset(tmp_path / "evqa", train_images=30, test_images=7)
    rows = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "dev", "test")}
    images = {s: {r["image"] for r in rs} for s, rs in rows.items()}
    assert len(images["train"]) + len(images["dev"]) == 30 and len(images["dev"]) == 3
    assert not images["train"] & images["dev"] and len(images["test"]) == 7
    assert all("/test/images/" in p for p in images["test"]) and all(Path(p).is_file() for s in images.values()
                                                                      for p in s)
    source = json.loads((Path(easy_vqa.__file__).parent / "data" / "train" / "questions.json").read_text())
    assert len(rows["train"]) + len(rows["dev"]) == sum(1 for _, _, i in source if int(i) < 30)  # every question
    assert set(rows["train"][0]) == {"question", "answer", "image"}
    assert easy_vqa_dataset(tmp_path / "again", 30, 7).joinpath("dev.jsonl").read_text() == \
        (out / "dev.jsonl").read_text()  # deterministic
    with pytest.raises(LstError, match="train_images"):
        easy_vqa_dataset(tmp_path / "x", train_images=0)


TORCHRUN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, writer
    model, image_model, data, out, log_dir = sys.argv[1:6]
    real, mine = writer._write_shard, []
    def record(g, k, *args):
        mine.append([g.path, k])
        real(g, k, *args)
    writer._write_shard = record
    manifest = extract(ExtractConfig(model=model, image_model=image_model, dataset=data, out=out, max_length=16,
                                     batch_size=4, device="cpu", store_dtype="fp32", shard_tokens=34, chunk_tokens=17,
                                     error_sample=2))
    with open(os.path.join(log_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"shards": mine, "complete": manifest["complete"]}, f)
""")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_torchrun_two_processes_equal_one(tiny_bert, tiny_vit, vqa, tmp_path):
    script, logs = tmp_path / "run.py", tmp_path / "logs"
    script.write_text(TORCHRUN_SCRIPT)
    logs.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(tiny_bert),
                           str(tiny_vit), str(vqa), str(tmp_path / "dist"), str(logs)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((logs / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = ({tuple(x) for x in r["shards"]} for r in ranks)
    assert a and b and not a & b and all(r["complete"] for r in ranks)
    assert any(path.endswith("images") for path, _ in a | b)  # image shards were shared out too
    extract(vl_config(tiny_bert, tiny_vit, vqa, tmp_path / "single", shard_tokens=34, chunk_tokens=17))
    x, y = zarr.open_group(str(tmp_path / "dist"), mode="r"), zarr.open_group(str(tmp_path / "single"), mode="r")
    for name in ("train/hidden", "dev/hidden", "train/images/hidden", "dev/images/hidden", "train/image_index"):
        np.testing.assert_array_equal(x[name][:], y[name][:], err_msg=name)
    for key in ("splits", "request", "fidelity", "vision_language", "image_backbone"):
        assert x.attrs["lst"][key] == y.attrs["lst"][key], key
