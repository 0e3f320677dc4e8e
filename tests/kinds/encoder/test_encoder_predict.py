"""`lst predict`: labels from raw text equal the predictions made from an fp32 cache."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from cli import app
from featcache import ExtractConfig, extract
from sidetrain import TrainConfig, train
from sidetrain.kinds.encoder.predict import Predictor


def test_predict_from_raw_text_equals_cache(tiny_bert, tiny_dataset, tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(store), store_dtype="fp32",
                          max_length=16, device="cpu"))
    train(TrainConfig(store=str(store), out=str(run), epochs=3, batch_size=16, reduction_factor=4, device="cpu"))
    texts = pd.read_csv(tiny_dataset / "dev.tsv", sep="\t")["text"].astype(str).tolist()
    predictor = Predictor(run, "cpu")
    pred = predictor.predict(texts, batch_size=7)  # other batches than training used: padding must not matter
    cached = json.loads((run / "predictions.json").read_text())["dev"]
    assert pred.tolist() == cached
    names = predictor.label_names(pred)
    assert set(names) <= {"class_0", "class_1", "class_2"}

    (tmp_path / "in.txt").write_text("\n".join(texts[:3]) + "\n")
    r = CliRunner().invoke(app, ["predict", str(run), str(tmp_path / "in.txt"), "--text", texts[3], "--device", "cpu"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "\t" in line]
    assert [line.split("\t")[0] for line in lines] == names[:4]
    r = CliRunner().invoke(app, ["predict", str(tmp_path / "nope"), "--text", "hi"])
    assert r.exit_code == 1 and "finished run folder" in r.output
