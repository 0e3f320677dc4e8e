"""Reading real-world delimited files: quoting, headers, encodings, rejected rows."""

from __future__ import annotations

import pytest
from conftest import GLUE

from featcache.errors import DatasetError
from featcache.text.sources import Quoting, load_dataset_path, resolve_columns


def test_quoted_newlines_need_csv_quoting(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text('text\tlabel\n"a text that\nspans lines"\tx\nplain\ty\n', encoding="utf-8")
    data = load_dataset_path(f, Quoting.auto)
    table = data.splits["train"]
    assert table.quoting == "csv" and len(table.frame) == 2
    assert table.frame["text"][0] == "a text that\nspans lines"


def test_stray_quotes_kept_without_quote_handling(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text('sentence\tlabel\n" the witness " said\t1\n"an unclosed quote\t0\nok"\t1\n', encoding="utf-8")
    table = load_dataset_path(f, Quoting.auto).splits["train"]
    assert table.quoting == "none" and len(table.frame) == 3 and table.rejected_rows == 0
    # forced csv quoting merges rows, which is what the auto mode avoids
    assert len(load_dataset_path(f, Quoting.csv).splits["train"].frame) < 3


def test_rejected_rows_are_counted(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("text\tlabel\ngood\t1\nbad row with no label\nalso\tgood\t\textra\nfine\t0\n", encoding="utf-8")
    table = load_dataset_path(f, Quoting.none).splits["train"]
    assert len(table.frame) == 2 and table.rejected_rows == 2


def test_non_utf8_file_is_a_clear_error(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_bytes("text\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="UTF-8"):
        load_dataset_path(f)


def test_jsonl_and_split_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0}\n')
    (tmp_path / "dev.jsonl").write_text('{"sentence": "c", "label": 1}\n')
    data = load_dataset_path(tmp_path)
    assert sorted(data.splits) == ["dev", "train"]
    cols = resolve_columns(data, None, None, None)
    assert (cols.text, cols.pair, cols.label) == ("sentence", None, "label")


def test_save_to_disk_folder(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}),
                               "validation": datasets.Dataset.from_dict({"text": ["z"], "label": [1]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    data = load_dataset_path(tmp_path / "saved")
    assert sorted(data.splits) == ["train", "validation"] and len(data.splits["train"].frame) == 2


def test_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("text\tlabel\na\t1\n")
    first = load_dataset_path(f).fingerprint
    f.write_text("text\tlabel\na\t0\n")
    assert load_dataset_path(f).fingerprint != first


@pytest.mark.skipif(not GLUE.exists(), reason="../shared/data/glue is not present")
@pytest.mark.parametrize("task,rows,pair", [("MRPC", 3668, "#2 String"), ("STS-B", 5749, "sentence2"),
                                            ("SST-2", 67349, None), ("RTE", 2490, "sentence2")])
def test_glue_row_counts(task, rows, pair):
    data = load_dataset_path(GLUE / task)
    assert len(data.splits["train"].frame) == rows and data.splits["train"].rejected_rows == 0
    assert resolve_columns(data, None, None, None).pair == pair
