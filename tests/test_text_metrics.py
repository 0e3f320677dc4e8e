"""sidetrain/text_metrics.py: exact match, VQA accuracy, BLEU and CIDEr-D of generated text."""

import sys

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from featcache.errors import LstError
from sidetrain.text_metrics import bleu, cider, exact_match, generation_scores, normalise, vqa_accuracy

SENTENCE = "A man is riding a brown horse along the beach at sunset."


@pytest.mark.parametrize("text, want", [
    ("A  Cat.", "a cat"),
    ("  a cat  ", "a cat"),
    ("Hello, World!", "hello world"),
    ("(left) -- right...", "left right"),
    ("Don't sit on the T-shirt; it's 3.5 m long.", "don't sit on the t-shirt it's 3.5 m long"),
    ("\tTwo\nlines ", "two lines"),
    ("?!", ""),
])
def test_normalise(text, want):
    assert normalise(text) == want


def test_identical_texts_score_full_marks():
    scores = generation_scores([SENTENCE], [[SENTENCE]])
    assert set(scores) == {"exact_match", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"}
    assert scores["exact_match"] == 1.0
    for k in range(1, 5):
        assert scores[f"bleu_{k}"] == pytest.approx(1.0, abs=1e-6)
    assert all(isinstance(v, float) for v in scores.values())


def test_totally_different_texts_score_zero():
    preds = ["purple elephants dance quietly tonight", "seven green bottles", "rain"]
    refs = [[SENTENCE], ["a dog sleeps on the sofa"], ["two cats play with a ball"]]
    scores = generation_scores(preds, refs)
    assert scores["exact_match"] == 0.0
    for k in range(1, 5):
        assert scores[f"bleu_{k}"] == pytest.approx(0.0, abs=1e-6)
    assert scores["cider"] == 0.0


def test_cider_by_hand():
    # Two examples whose 1- and 2-grams occur in one example's references each: idf = log(2) for all,
    # so each prediction's tf-idf vector equals its reference's (cosine 1 for 1- and 2-grams, 0 for the
    # absent 3- and 4-grams): mean(1, 1, 0, 0) * 10 = 5 per example, 5 for the corpus.
    assert cider(["red apple", "blue car"], [["red apple"], ["blue car"]]) == pytest.approx(5.0)
    # A one-example corpus: every n-gram is in every example's references, idf 0, CIDEr 0 even when identical.
    assert cider([SENTENCE], [[SENTENCE]]) == 0.0


def test_cider_and_bleu_match_pycocoevalcap_called_directly():
    preds = ["A dog runs on the grass.", "Two people  ride bikes", "", "a plate of FOOD on a table"]
    refs = [["a dog running across the grass", "The dog runs on green grass."],
            ["two people riding bicycles down a street", "people ride their bikes"],
            ["a cat sleeping"],
            ["a plate of food sitting on a wooden table", "food on a plate", "a table with a plate of food"]]
    gts = {i: [normalise(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [normalise(p)] for i, p in enumerate(preds)}
    want_cider, _ = Cider().compute_score(gts, res)
    want_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert cider(preds, refs) == pytest.approx(float(want_cider))
    assert cider(preds, refs) > 0
    got = bleu(preds, refs)
    assert [got[f"bleu_{k}"] for k in range(1, 5)] == pytest.approx([float(b) for b in want_bleu])
    assert list(bleu(preds, refs, n=2)) == ["bleu_1", "bleu_2"]
    assert generation_scores(preds, refs) == {"exact_match": 0.0, **got, "cider": pytest.approx(want_cider)}


def test_several_references_per_prediction():
    preds = ["Two dogs.", "a red bus", "yes"]
    refs = [["a pair of dogs", "two dogs"], ["a bus", "red bus"], ["no", "yes", "yes", "yes", "no"]]
    assert exact_match(preds, refs) == pytest.approx(2 / 3)
    # VQA: 1 of 2 references (threshold min(3, 2) = 2) -> 0.5; none -> 0; 3 of 5 -> 1.
    assert vqa_accuracy(preds, refs) == pytest.approx((0.5 + 0.0 + 1.0) / 3)


def test_vqa_accuracy():
    humans = ["two"] * 2 + ["2"] * 3 + ["three"] * 5
    assert vqa_accuracy(["Two", "2", "three", "four"], [humans] * 4) == pytest.approx((2 / 3 + 1 + 1 + 0) / 4)
    # One reference per question: exact match.
    preds, refs = ["Yes.", "blue", "2"], [["yes"], ["red"], ["2"]]
    assert vqa_accuracy(preds, refs) == exact_match(preds, refs) == pytest.approx(2 / 3)


def test_empty_predictions_score_zero():
    scores = generation_scores(["", "  ."], [["a cat"], ["a dog"]])
    assert scores == dict.fromkeys(["exact_match", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"], 0.0)
    assert vqa_accuracy([""], [["yes"]]) == 0.0


@pytest.mark.parametrize("preds, refs, message", [
    (["a", "b"], [["a"]], "one list of references per prediction. Got 2 predictions and 1 reference lists."),
    (["a"], [[]], "Expected at least one reference for prediction 0. Got none."),
    (["a"], ["a"], "Expected a list of reference strings for prediction 0. Got str."),
    (["a", "b"], [["a"], ["b", "..."]], "reference 1 of prediction 1 to have words after normalisation"),
    ([], [], "Expected at least one prediction. Got none."),
    ("a", [["a"]], "Got a single string."),
])
def test_invalid_inputs(preds, refs, message):
    for fn in (exact_match, vqa_accuracy, bleu, cider, generation_scores):
        with pytest.raises(ValueError, match="^Expected ") as e:
            fn(preds, refs)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_bleu_order_is_checked():
    with pytest.raises(ValueError, match="BLEU order n between 1 and 4"):
        bleu(["a"], [["a"]], n=5)


def test_missing_pycocoevalcap_is_a_one_line_lst_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)
    with pytest.raises(LstError, match="pip install --no-deps pycocoevalcap==1.2") as e:
        bleu(["a cat"], [["a cat"]])
    assert "\n" not in str(e.value)
    assert exact_match(["a cat"], [["a cat"]]) == 1.0  # the standard-library scores still work
