"""A trained run as a model in Python (#27), for every kind: `LadderModel.predict` equals `lst predict`
(predict_lines) and the cached evaluation (predictions.json); forward gives transformers' output classes with the
same labels; a saved folder loads back to equal outputs; device and dtype moves; the pipelines; one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import invoke, synthetic_rows, torch_threads, write_tsv
from transformers.modeling_outputs import ImageClassifierOutput, Seq2SeqLMOutput, SequenceClassifierOutput

from featcache import ExtractConfig, extract
from featcache.bundled import easy_vqa_dataset
from featcache.errors import LstError
from sidetrain import LadderModel, TrainConfig, train
from sidetrain.predict import predict_lines

pytestmark = pytest.mark.usefixtures("one_thread")


def run_of(store: Path, out: Path, **kw) -> Path:
    with torch_threads(1):  # module fixtures run before the one_thread fixture
        train(TrainConfig(store=str(store), out=str(out), **{"epochs": 2, "batch_size": 8, "reduction_factor": 4,
                                                               "device": "cpu", **kw}))
    return out


def cached_labels(run: Path, split: str) -> list[str]:
    names = json.loads((run / "config.json").read_text())["store_manifest"]["task"]["label_names"]
    return [names[i] for i in json.loads((run / "predictions.json").read_text())[split]]


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> Path:
    """easy-VQA's real PNGs and questions: 9 train images, 1 dev, 2 test."""
    return easy_vqa_dataset(tmp_path_factory.mktemp("easy_vqa"), train_images=10, test_images=2)


@pytest.fixture(scope="module")
def encoder_run(tiny_store, tmp_path_factory) -> Path:
    return run_of(tiny_store, tmp_path_factory.mktemp("encoder") / "run")


@pytest.fixture(scope="module")
def t5_run(tiny_t5, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t5")
    write_tsv(root / "data" / "train.tsv", synthetic_rows(24, 1))
    write_tsv(root / "data" / "dev.tsv", synthetic_rows(8, 2))
    with torch_threads(1):
        extract(ExtractConfig(model=str(tiny_t5), dataset=str(root / "data"), out=str(root / "store"),
                              store_dtype="fp32", max_length=16, device="cpu", error_sample=0))
    return run_of(root / "store", root / "run", lr=1e-2)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    """DATA/<split>/<shape>/<id>.png from easy-VQA's real images: 2 per shape to train on, 1 per shape to test."""
    import easy_vqa

    base = Path(easy_vqa.__file__).parent / "data"
    root = tmp_path_factory.mktemp("shapes")
    for split, source, n in (("train", "train", 2), ("test", "test", 1)):
        shapes: dict[str, list[int]] = {}
        for _, answer, image in json.loads((base / source / "questions.json").read_text()):
            if answer in ("circle", "rectangle", "triangle") and image not in shapes.setdefault(answer, []):
                shapes[answer].append(image)
        for shape, images in shapes.items():
            (root / split / shape).mkdir(parents=True, exist_ok=True)
            for image in sorted(images)[:n]:
                shutil.copy(base / source / "images" / f"{image}.png", root / split / shape / f"{image}.png")
    return root


@pytest.fixture(scope="module")
def image_run(tiny_vit, image_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image")
    with torch_threads(1):
        extract(ExtractConfig(model=str(tiny_vit), dataset=str(image_data), out=str(root / "store"),
                              store_dtype="fp32", batch_size=4, device="cpu", error_sample=0))
    return run_of(root / "store", root / "run")


@pytest.fixture(scope="module")
def vl_run(tiny_bert, tiny_vit, vqa_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vl")
    with torch_threads(1):
        extract(ExtractConfig(model=str(tiny_bert), dataset=str(vqa_data), image_model=str(tiny_vit),
                              out=str(root / "store"), store_dtype="fp32", max_length=16, device="cpu",
                              error_sample=0))
    return run_of(root / "store", root / "run")


def image_inputs(image_data: Path) -> tuple[list[str], list[str]]:
    """The test split's image paths in the store's row order (by class, then file name), and their classes."""
    found = [(p, c.name) for c in sorted((image_data / "test").iterdir()) for p in sorted(c.iterdir())]
    return [str(p) for p, _ in found], [c for _, c in found]


def vl_inputs(vqa_data: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (vqa_data / "test.jsonl").read_text().splitlines()]
    return [(str(vqa_data / r["image"]), r["question"]) for r in rows]


@pytest.fixture(scope="module")
def cases(encoder_run, t5_run, image_run, vl_run, image_data, vqa_data):
    """kind -> (run, python inputs, `lst predict` lines, the split predictions.json labels them for)."""
    texts = [t for t, _ in synthetic_rows(30, 3)]  # tiny_dataset's test split
    t5_texts = [t for t, _ in synthetic_rows(8, 2)]
    paths, _ = image_inputs(image_data)
    rows = vl_inputs(vqa_data)
    return {
        "encoder": (encoder_run, texts, texts, "test", SequenceClassifierOutput),
        "seq2seq": (t5_run, t5_texts, t5_texts, "dev", Seq2SeqLMOutput),
        "image": (image_run, paths, paths, "test", ImageClassifierOutput),
        "vision_language": (vl_run, rows, [f"{p}\t{q}" for p, q in rows], "test", SequenceClassifierOutput),
    }


KINDS = ["encoder", "seq2seq", "image", "vision_language"]


@pytest.mark.parametrize("kind", KINDS)
def test_predict_equals_lst_predict_and_the_cached_evaluation(cases, kind, tmp_path):
    run, inputs, lines, split, output_class = cases[kind]
    model = LadderModel.from_pretrained(run, device="cpu")
    assert isinstance(model, torch.nn.Module) and model.kind == kind and not model.training
    labels = model.predict(inputs, batch_size=3)  # other batches than evaluation used: padding must not matter
    assert labels == predict_lines(str(run), lines, device="cpu") == cached_labels(run, split)
    # forward: transformers' output class, the same labels, and a loss when labels are given
    few = inputs[:4]
    batch = model.preprocess(few)
    if kind == "seq2seq":  # teacher-forced on each text's predicted label text; the loss is their cross-entropy
        s = model.manifest["seq2seq"]
        targets = [s["candidate_ids"][model.label_names.index(label)] for label in labels[:4]]
        width = max(len(t) for t in targets)
        batch["labels"] = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
        out = model(**batch)
        assert isinstance(out, output_class) and out.logits.shape[:2] == batch["labels"].shape
        scores = torch.from_numpy(model.logits(few))  # sum of log-probs of each candidate
        nll = -scores[range(len(few)), [model.label_names.index(x) for x in labels[:4]]]
        assert float(out.loss.detach()) == pytest.approx(float(nll.sum()) / int((batch["labels"] != -100).sum()), rel=1e-4)
        made = model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=3)
        assert made.shape[0] == len(few) and (made[:, 0] == s["decoder_start_token_id"]).all()
        texts = model.predict(few[:2], generate=True)  # `lst predict --generate` decodes up to 16 tokens
        assert texts == predict_lines(str(run), lines[:2], generate=True, device="cpu")
    else:
        target = torch.tensor([model.label_names.index(x) for x in labels[:4]])
        out = model(**batch, labels=target)
        assert isinstance(out, output_class) and out.logits.shape == (len(few), len(model.label_names))
        assert [model.label_names[i] for i in out.logits.argmax(-1)] == labels[:4]
        assert float(out.loss.detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(out.logits.detach(), target)))
        with pytest.raises(LstError, match="generates text"):
            model.generate()


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_folder_loads_back_to_equal_outputs(cases, kind, tmp_path):
    run, inputs, lines, _, _ = cases[kind]
    model = LadderModel.from_pretrained(run, device="cpu")
    expected_logits = model.logits(inputs)
    saved = model.save_pretrained(tmp_path / "saved", copy_backbone=True)
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "backbone"} <= names
    assert ("image_backbone" in names) == (kind == "vision_language")
    card = (saved / "README.md").read_text()
    assert "lst train" in card and "lst extract" in card and "## Metrics" in card
    loaded = LadderModel.from_pretrained(saved, device="cpu")
    np.testing.assert_allclose(loaded.logits(inputs), expected_logits, rtol=1e-5, atol=1e-6)
    assert loaded.manifest["backbone"]["name"] == str((saved / "backbone").resolve())  # the copy, not the original
    # `lst predict` reads a saved folder like a run; saving again into the same folder is allowed
    result = invoke("predict", saved, *(["--text", lines[0]] if kind in ("encoder", "seq2seq") else
                                        [lines[0]] if kind == "image" else
                                        ["--text", inputs[0][1], "--image", inputs[0][0]]), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].split("\t")[0] == model.predict(inputs[:1])[0]
    loaded.save_pretrained(saved)  # a reference, this time, to the copy the first save made
    assert LadderModel.from_pretrained(saved, device="cpu").predict(inputs) == model.predict(inputs)


@pytest.mark.parametrize("kind", KINDS)
def test_device_and_dtype_moves(cases, kind):
    run, inputs, _, _, _ = cases[kind]
    model = LadderModel.from_pretrained(run, device="cpu")
    reference, labels = model.logits(inputs), model.predict(inputs)
    model.to(torch.float64)  # every part moves, and the backbone wrappers follow (their inputs' dtype)
    assert model.dtype == torch.float64 and next(model.backbone.parameters()).dtype == torch.float64
    np.testing.assert_allclose(model.logits(inputs), reference, rtol=1e-4, atol=1e-4)
    model.to("cpu", torch.float32)
    np.testing.assert_allclose(model.logits(inputs), reference, rtol=1e-5, atol=1e-5)
    half = LadderModel.from_pretrained(run, device="cpu", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device.type == "cpu"
    same = np.mean([a == b for a, b in zip(half.predict(inputs), labels)])
    assert same >= 0.7, same  # bf16 on the CPU: labels mostly equal
    np.testing.assert_allclose(half.logits(inputs), reference, atol=0.1 * max(1.0, float(np.abs(reference).max())))
    model.train()
    assert model.side.training and all(not p.model.training for p in model.frozen_parts())  # backbones stay eval


def test_pipelines_match_predict(cases):
    encoder, texts = cases["encoder"][0], cases["encoder"][1]
    model = LadderModel.from_pretrained(encoder, device="cpu")
    pipe = model.pipeline()
    assert isinstance(pipe, transformers.Pipeline) and pipe.task == "text-classification"
    labels = model.predict(texts)
    assert [d["label"] for d in pipe(texts)] == labels
    assert [d["label"] for d in pipe(t for t in texts[:3])] == labels[:3]  # a generator streams, one at a time
    assert "TextClassificationPipeline" in repr(pipe)
    one = pipe(texts[0])
    assert one[0]["label"] == labels[0] and 0 < one[0]["score"] <= 1
    top = pipe(texts[0], top_k=2)
    assert len(top) == 2 and top[0]["score"] >= top[1]["score"]

    image = LadderModel.from_pretrained(cases["image"][0], device="cpu")
    paths = cases["image"][1]
    pipe = image.pipeline()
    from PIL import Image

    got = pipe(Image.open(paths[0]))  # an in-memory image takes the path a file takes
    assert got[0]["label"] == image.predict(paths[:1])[0] and len(got) == min(5, len(image.label_names))
    assert [g[0]["label"] for g in pipe(paths)] == image.predict(paths)

    vl = LadderModel.from_pretrained(cases["vision_language"][0], device="cpu")
    rows = cases["vision_language"][1]
    pipe = vl.pipeline()
    assert pipe.task == "visual-question-answering"
    assert pipe(image=rows[0][0], question=rows[0][1])[0]["answer"] == vl.predict(rows[:1])[0]
    assert [g[0]["answer"] for g in pipe([{"image": p, "question": q} for p, q in rows])] == vl.predict(rows)

    t5 = LadderModel.from_pretrained(cases["seq2seq"][0], device="cpu")
    t5_texts = cases["seq2seq"][1][:3]
    pipe = t5.pipeline()
    assert pipe.task == "text2text-generation"
    made = t5.predict(t5_texts, generate=True, max_new_tokens=3)
    assert [d["generated_text"] for d in pipe(t5_texts, max_new_tokens=3)] == made
    assert pipe(t5_texts[0], max_new_tokens=3) == [{"generated_text": made[0]}]
    assert [d["label"] for d in t5.pipeline("text-classification")(t5_texts)] == t5.predict(t5_texts)


def test_user_mistakes_are_one_line_lst_errors(encoder_run, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "nope", tmp_path / "empty"):
        with pytest.raises(LstError, match="finished run folder or a folder LadderModel.save_pretrained wrote"):
            LadderModel.from_pretrained(folder)
    model = LadderModel.from_pretrained(encoder_run, device="cpu")
    with pytest.raises(LstError, match="generates text"):
        model.generate()
    with pytest.raises(LstError, match="image-classification"):
        model.pipeline("image-classification")
    with pytest.raises(LstError, match="image_backbone= only"):
        LadderModel.from_pretrained(encoder_run, image_backbone="somewhere")
    with pytest.raises(LstError, match="empty folder or one LadderModel.save_pretrained wrote"):
        model.save_pretrained(encoder_run)  # a run folder is not overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LstError, match="notes.txt"):
        model.save_pretrained(tmp_path / "mine")
    with pytest.raises(LstError, match="dtype"):
        LadderModel.from_pretrained(encoder_run, device="cpu", dtype="int4")
