"""Vision-language stores over a T5 text backbone (VL-T5, #22) and several images per row (NLVR2-style): the
store's layout, cached == online training, pruned init, the run as a model (candidate answers == the cached
evaluation; greedy and beam generation), and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import COLOURS, assert_user_error, draw, invoke

from featcache import ExtractConfig, extract, open_store
from featcache.errors import DatasetError
from sidetrain import LadderModel, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """Six images (3 colours x 2 shapes); VQA rows (two questions per image) and pair rows (statements about a
    left and a right image, true or false), train over all six images, dev over four."""
    root = tmp_path_factory.mktemp("shapes")
    images = [(c, s, draw(root / "pics" / f"{c}_{s}.png", c, s)) for c in COLOURS for s in ("circle", "rectangle")]
    for split, chosen in (("train", images), ("dev", images[:4])):
        vqa, pairs = [], []
        for i, (c, s, p) in enumerate(chosen):
            vqa += [{"question": "what color is the shape?", "answer": c, "image": f"../pics/{p.name}"},
                    {"question": "what shape is it?", "answer": s, "image": f"../pics/{p.name}"}]
            q = chosen[(i + 1) % len(chosen)]
            pairs += [{"sentence": "both images show the same color", "label": str(c == q[0]).lower(),
                       "left": str(p), "right": str(q[2])},
                      {"sentence": "the left image shows a circle", "label": str(s == "circle").lower(),
                       "left": str(p), "right": str(q[2])}]
        write_jsonl(root / "vqa" / f"{split}.jsonl", vqa)
        write_jsonl(root / "pairs" / f"{split}.jsonl", pairs)
    return {"vqa": root / "vqa", "pairs": root / "pairs", "pics": root / "pics"}


def vl_store(model: Path, vit: Path, data: Path, out: Path, **kw) -> Path:
    extract(ExtractConfig(model=str(model), dataset=str(data), out=str(out), image_model=str(vit), store_dtype="fp32",
                          max_length=16, batch_size=4, device="cpu", **kw))
    return out


@pytest.fixture(scope="module")
def t5_vqa(tiny_t5, tiny_vit, shapes, tmp_path_factory) -> Path:
    return vl_store(tiny_t5, tiny_vit, shapes["vqa"], tmp_path_factory.mktemp("t5_vqa") / "store.zarr")


@pytest.fixture(scope="module")
def t5_pairs(tiny_t5, tiny_vit, shapes, tmp_path_factory) -> Path:
    return vl_store(tiny_t5, tiny_vit, shapes["pairs"], tmp_path_factory.mktemp("t5_pairs") / "store.zarr",
                    image_column="left,right", text_column="sentence", label_column="label")


def run(store: Path, out: Path, **kw) -> dict:
    options = {"store": str(store), "out": str(out), "epochs": 2, "batch_size": 4, "reduction_factor": 2,
               "device": "cpu", "resume": False}
    return train(TrainConfig(**{**options, **kw}))


def test_a_t5_vl_store_holds_the_t5_text_part_and_each_image_once(t5_vqa, t5_pairs):
    m = open_store(t5_vqa).manifest
    assert m["kind"] == "vision_language" and m["vision_language"]["text_backbone"] == "t5"
    assert m["seq2seq"]["label_texts"] == m["task"]["label_names"]  # the answers are their own target texts
    group = zarr.open_group(str(t5_vqa), mode="r")
    assert {"lm_head", "encoder_relative_bias", "decoder_relative_bias"} <= set(group["backbone_weights"].keys())
    assert group["train/images/offsets"].shape[0] - 1 == 6 and group["dev/images/offsets"].shape[0] - 1 == 4
    np.testing.assert_array_equal(group["train/dec/candidates"][:], open_store(t5_vqa).split("train").labels)
    per_example = m["splits"]["dev"]["candidates_per_example"]
    assert per_example == m["task"]["num_labels"]  # every candidate answer on dev: scored from the cache
    pairs = open_store(t5_pairs).manifest
    assert pairs["vision_language"]["images_per_row"] == 2 and pairs["vision_language"]["image_column"] == "left,right"
    index = zarr.open_group(str(t5_pairs), mode="r")["train/image_index"][:]
    assert index.shape == (12, 2) and index.max() == 5  # 12 statements over the 6 distinct images, each stored once
    np.testing.assert_array_equal(index[::2, 1], np.roll(index[::2, 0], -1))  # right = the next image


@pytest.mark.parametrize("which", ["t5_vqa", "t5_pairs"])
def test_vl_t5_trains_from_the_cache_exactly_as_with_both_backbones_live(which, request, tmp_path):
    store = request.getfixturevalue(which)
    cached = run(store, tmp_path / "cached")
    online = run(store, tmp_path / "online", online=True)
    assert cached["mode"] == "cached" and online["mode"] == "online"
    losses = [h["train_loss"] for h in cached["history"]]
    np.testing.assert_allclose(losses, [h["train_loss"] for h in online["history"]], rtol=1e-5)
    assert cached["splits"]["dev"] == online["splits"]["dev"]


def test_the_side_encoder_reads_the_image_and_the_text_bias_only_between_text_positions(t5_pairs, tmp_path):
    from sidetrain.kinds.vision_language.t5_recipe import build_vision_t5
    from sidetrain.t5.recipe import store_weights

    store = open_store(t5_pairs)
    torch.manual_seed(0)
    model = build_vision_t5(TrainConfig(store="", out="", reduction_factor=2, dropout=0.0), store.manifest,
                            store_weights(store)).eval()
    hidden = torch.randn(1, 5, 3, 32)
    mask = torch.ones(1, 5, dtype=torch.bool)
    tokens = int(store.manifest["image"]["tokens"])
    image = torch.randn(1, 2 * tokens, 1, 32)
    out, joint = model.encode_with_image(hidden, mask, image)
    assert out.shape == (1, 5 + 2 * tokens, 16) and joint.all()
    swapped = torch.cat([image[:, tokens:], image[:, :tokens]], dim=1)  # the image-order embedding tells them apart
    assert not torch.allclose(model.encode_with_image(hidden, mask, swapped)[0][:, :5], out[:, :5])
    text_only = model.encode(hidden, mask)
    assert text_only.shape == (1, 5, 16)


def test_pruned_init_prunes_the_text_only_t5(t5_vqa, tmp_path):
    summary = run(t5_vqa, tmp_path / "pruned", init="pruned", epochs=1)
    assert summary["splits"]["dev"]["accuracy"] >= 0
    assert Path(str(t5_vqa) + ".fisher.safetensors").exists()  # text-only Fisher scores, cached beside the store


def test_the_run_as_a_model_scores_answers_as_the_cache_did_and_generates(t5_vqa, t5_pairs, shapes, tmp_path):
    from sidetrain.predict import predict_lines, read_examples
    from sidetrain.t5.decoding import beam_search, greedy, side_logits

    for store, data in ((t5_vqa, shapes["vqa"]), (t5_pairs, shapes["pairs"])):
        out = tmp_path / store.parent.name
        run(store, out, epochs=3)
        lines = read_examples(str(out), [str(data / "dev.jsonl")], [], [])
        names = open_store(store).manifest["task"]["label_names"]
        cached = [names[i] for i in json.loads((out / "predictions.json").read_text())["dev"]]
        assert predict_lines(str(out), lines, device="cpu") == cached  # both backbones live == the cache
        model = LadderModel.from_pretrained(out, device="cpu")
        inputs = model.preprocess(lines[:3])
        enc = model.encode(**inputs)
        made = greedy(model.side, model.t5, model.s, enc, 4)
        assert made == beam_search(model.side, model.t5, model.s, enc, 4, num_beams=1)
        with torch.no_grad():  # greedy tokens are the teacher-forced argmax of the side network on its own output
            for i, ids in enumerate(made):
                logits, _ = side_logits(model.side, model.t5, model.s, [ids], torch.tensor([i]), enc)
                assert logits[0].argmax(-1).tolist()[:len(ids)] == ids
        beams = model.predict(lines[:3], generate=True, max_new_tokens=4, num_beams=3)
        assert len(beams) == 3 and all(isinstance(b, str) for b in beams)
        ids = model.generate(**inputs, max_new_tokens=4, num_beams=2)
        assert ids.shape[0] == 3 and (ids[:, 0] == model.s["decoder_start_token_id"]).all()
        labels = torch.tensor([[5, 102], [6, -100], [7, 102]])
        assert model(**inputs, labels=labels).loss.item() > 0


def test_cli_predict_generates_and_refuses_in_one_line(t5_pairs, shapes, tmp_path):
    out = tmp_path / "run"
    run(t5_pairs, out, epochs=1)
    left, right = shapes["pics"] / "red_circle.png", shapes["pics"] / "blue_circle.png"
    result = invoke("predict", str(out), "--text", "both images show the same color", "--image", str(left),
                    "--image", str(right), "--generate", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].endswith("\tboth images show the same color")
    assert_user_error(invoke("predict", str(out), "--text", "x", "--image", str(left), "--device", "cpu"),
                      "2 --image")


def test_two_images_per_row_over_an_encoder_text_backbone(tiny_bert, tiny_vit, shapes, tmp_path):
    store = vl_store(tiny_bert, tiny_vit, shapes["pairs"], tmp_path / "store.zarr", image_column="left,right",
                     text_column="sentence", label_column="label")
    cached = run(store, tmp_path / "cached")
    online = run(store, tmp_path / "online", online=True)
    np.testing.assert_allclose([h["train_loss"] for h in cached["history"]],
                               [h["train_loss"] for h in online["history"]], rtol=1e-5)
    lines = [f"{shapes['pics'] / 'red_circle.png'}\t{shapes['pics'] / 'red_rectangle.png'}\tsame color"]
    model = LadderModel.from_pretrained(tmp_path / "cached", device="cpu")
    assert model.predict(lines)[0] in ("true", "false")
    result = invoke("predict", str(tmp_path / "cached"), "--text", "x", "--image", str(shapes["pics"] / "red_circle.png"),
                    "--image", str(shapes["pics"] / "red_circle.png"), "--generate", "--device", "cpu")
    assert_user_error(result, "generate")
    assert_user_error(invoke("predict", str(tmp_path / "cached"), "--text", "x", "--image", str(shapes["pics"] /
                             "red_circle.png"), "--image", str(shapes["pics"] / "red_circle.png"), "--generate",
                             "--num-beams", "2", "--device", "cpu"), "--num-beams only for T5 and VL-T5 runs")


def test_a_row_naming_fewer_images_is_one_line(tiny_t5, tiny_vit, shapes, tmp_path):
    rows = [json.loads(x) for x in (shapes["pairs"] / "train.jsonl").read_text().splitlines()]
    rows[3]["right"] = ""
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", rows)
    with pytest.raises(DatasetError, match="row 3 \\(column 'right'\\)"):
        vl_store(tiny_t5, tiny_vit, data, tmp_path / "s.zarr", image_column="left,right", text_column="sentence")
    result = invoke("extract", str(tiny_t5), str(data), "--image-model", str(tiny_vit), "--image-column",
                    "left,nope", "--text-column", "sentence", "--out", str(tmp_path / "t.zarr"), "--device", "cpu")
    assert_user_error(result, "nope")


@pytest.fixture(scope="module")
def t5_captions(tiny_t5, tiny_vit, shapes, tmp_path_factory) -> Path:
    """Two reference captions per image ("a red circle", "one red circle"), one row each (as COCO's)."""
    root = tmp_path_factory.mktemp("captions")
    for split in ("train", "dev"):
        rows = []
        for line in (shapes["vqa"] / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "color" in r["question"]:
                shape = "circle" if "circle" in r["image"] else "rectangle"
                image = str((shapes["vqa"] / r["image"]).resolve())
                rows += [{"text": "caption:", "caption": f"{w} {r['answer']} {shape}", "image": image}
                         for w in ("a", "one")]
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def caption_store(tiny_t5, tiny_vit, data: Path, out: Path) -> Path:
    return vl_store(tiny_t5, tiny_vit, data, out, task="generate", label_column="caption")


def test_captions_train_from_the_cache_and_are_scored_by_generation(tiny_t5, tiny_vit, t5_captions, tmp_path):
    store = caption_store(tiny_t5, tiny_vit, t5_captions, tmp_path / "caps.zarr")
    m = open_store(store).manifest
    assert m["task"] == {"type": "generate", "label_names": [], "num_labels": 1}
    assert m["seq2seq"]["targets"] == "text" and m["splits"]["dev"]["candidates_per_example"] == 1
    summary = run(store, tmp_path / "run", epochs=40, lr=1e-2, reduction_factor=1, metric="cider")
    dev = summary["splits"]["dev"]
    assert set(dev) == {"exact_match", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"} and summary["metric"] == "cider"
    # each image's two rows are one input, scored against both its captions: memorised, every generation is one
    assert dev["exact_match"] == 1.0
    made = json.loads((tmp_path / "run" / "predictions.json").read_text())["dev"]
    assert made[0] == made[1] and made[0] in ("a red circle", "one red circle")
    # generating from the cached states (training's evaluation) == generating with both backbones live
    lines = [f"{json.loads(x)['image']}\tcaption:" for x in (t5_captions / "dev.jsonl").read_text().splitlines()]
    model = LadderModel.from_pretrained(tmp_path / "run", device="cpu")
    assert model.predict(lines, generate=True, max_new_tokens=40) == made
    assert model.predict(lines[:2], generate=True, num_beams=3) == made[:2]
    # every row's text is "caption:": the backbone decoder (text alone) runs once per distinct prefix, not per image
    from dataclasses import replace

    from sidetrain.t5.decoding import greedy

    rows_run = []
    decode = model.t5.decode
    model.t5.decode = lambda ids, *a: rows_run.append(len(ids)) or decode(ids, *a)
    enc = model.encode(**{k: v for k, v in model.preprocess(lines).items()})
    shared = greedy(model.side, model.t5, model.s, enc, 6)
    assert rows_run[0] == 1 and max(rows_run) < len(lines)
    assert shared == greedy(model.side, model.t5, model.s, replace(enc, text_id=None), 6)


def test_generated_targets_refuse_bad_options_in_one_line(tiny_bert, tiny_t5, tiny_vit, t5_captions, t5_vqa,
                                                          tmp_path):
    result = invoke("extract", str(tiny_bert), str(t5_captions), "--image-model", str(tiny_vit), "--task",
                    "generate", "--label-column", "caption", "--out", str(tmp_path / "b.zarr"), "--device", "cpu")
    assert_user_error(result, "--task generate with a T5 text backbone")
    store = caption_store(tiny_t5, tiny_vit, t5_captions, tmp_path / "caps.zarr")
    result = invoke("train", str(store), "--out", str(tmp_path / "r"), "--metric", "accuracy", "--device", "cpu")
    assert_user_error(result, "a --metric for generated text")
    result = invoke("train", str(t5_vqa), "--out", str(tmp_path / "v"), "--metric", "cider", "--device", "cpu")
    assert_user_error(result, "--metric")
    out = tmp_path / "vqa_run"
    run(t5_vqa, out, epochs=1)
    image = str(json.loads((t5_captions / "dev.jsonl").read_text().splitlines()[0])["image"])
    assert_user_error(invoke("predict", str(out), "--text", "x", "--image", image, "--num-beams", "3",
                             "--device", "cpu"), "--num-beams", "without --generate")


def test_one_multi_task_model_over_vqa_statements_and_captions(tiny_t5, tiny_vit, t5_vqa, t5_pairs, t5_captions,
                                                               tmp_path):
    captions = caption_store(tiny_t5, tiny_vit, t5_captions, tmp_path / "captions.zarr")
    summary = train(TrainConfig(store=[str(t5_vqa), str(t5_pairs), str(captions)], out=str(tmp_path / "mt"),
                                epochs=2, batch_size=4, reduction_factor=2, device="cpu", resume=False))
    tasks = summary["tasks"]
    assert list(tasks) == ["store", "store-2", "captions"]  # each store's folder name, made unique
    metrics = [set(t["splits"]["dev"]) for t in tasks.values()]
    assert {"accuracy"} <= metrics[0] and {"accuracy"} <= metrics[1] and {"cider", "exact_match"} <= metrics[2]
    names = [tmp_path / "mt" / "tasks" / n for n in tasks]
    models = [LadderModel.from_pretrained(p, device="cpu").side for p in names]
    shared = [name for name, _ in models[0].named_parameters() if all(
        torch.equal(dict(m.named_parameters())[name], dict(models[0].named_parameters())[name]) for m in models)]
    assert any(n.startswith("enc_blocks") for n in shared) and any(n.startswith("dec_blocks") for n in shared)
    assert sum("visual.order" in dict(m.named_parameters()) for m in models) == 1  # the two-image task's own


def test_eval_beams_generate_the_evaluation_split_by_beam_search(tiny_t5, tiny_vit, t5_captions, tmp_path):
    store = caption_store(tiny_t5, tiny_vit, t5_captions, tmp_path / "caps.zarr")
    summary = run(store, tmp_path / "beams", epochs=1, eval_beams=2)
    assert json.loads((tmp_path / "beams" / "config.json").read_text())["eval_beams"] == 2
    assert set(summary["splits"]["dev"]) >= {"exact_match", "cider"}
    assert_user_error(invoke("train", str(store), "--out", str(tmp_path / "x"), "--eval-beams", "0"), "--eval-beams")


def test_the_synthetic_stand_ins_read_each_image_off_its_own_answers(tmp_path):
    from collections import Counter

    from featcache.bundled import easy_vqa_captions, easy_vqa_dataset, easy_vqa_pairs

    vqa = easy_vqa_dataset(tmp_path / "vqa", 40, 10)
    facts = {}
    for line in (vqa / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["question"] == "what shape is in the image?":
            facts.setdefault(row["image"], {})["shape"] = row["answer"]
    captions = [json.loads(x) for x in (easy_vqa_captions(vqa, tmp_path / "caps") / "train.jsonl").read_text()
                .splitlines()]
    assert captions and all(c["text"] == "caption:" and len(c["caption"].split()) == 3 for c in captions)
    assert all(c["caption"].endswith(facts[c["image"]]["shape"]) for c in captions if c["image"] in facts)
    pairs = [json.loads(x) for x in (easy_vqa_pairs(vqa, tmp_path / "pairs", per_image=4) / "train.jsonl")
             .read_text().splitlines()]
    assert len(pairs) == 8 * len(captions) and all(p["left"] != p["right"] for p in pairs)
    labels = Counter(p["label"] for p in pairs)
    assert set(labels) == {"true", "false"} and abs(labels["true"] - labels["false"]) < 0.3 * len(pairs)
    shape_of = {c["image"]: c["caption"].split()[-1] for c in captions}
    for p in pairs:
        if p["sentence"] == "the two images show the same shape":
            assert (p["label"] == "true") == (shape_of[p["left"]] == shape_of[p["right"]])
