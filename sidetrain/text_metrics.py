"""Scores for generated text against reference texts: evaluation splits whose targets are open text
(VQA answers a model generates, image captions).

Every score compares texts after `normalise`, the stand-in for the Java PTB tokenizer that the COCO
caption evaluation runs first (never imported here: pycocoevalcap's PTBTokenizer needs Java). BLEU and
CIDEr come from pycocoevalcap's pure-Python scorers (PyPI `pycocoevalcap==1.2`, which `make setup`
installs with --no-deps); exact match and VQA accuracy need nothing outside the standard library.

Inputs, for every function: `predictions`, one generated text per example, and `references`, a list of
one or more reference texts per example. An empty prediction is allowed and scores 0; a reference that
is empty after normalisation is an error (it could only ever match an empty prediction).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from featcache.errors import LstError, expected

_INSTALL_HINT = "Install it with `pip install --no-deps pycocoevalcap==1.2` (`make setup` does)."
_PUNCT_RUN = re.compile(r"[^\w\s]+")
_SPACES = re.compile(r"\s+")
BLEU_MAX_N = 4  # pycocoevalcap's BleuScorer counts n-grams up to 4 whatever n it is given


def normalise(text: str) -> str:
    """Lower case, punctuation dropped except inside words, whitespace stripped and collapsed.

    A simple tokenisation standing in for the Stanford PTB tokenizer (Java) that the COCO caption
    evaluation runs before scoring: a run of punctuation is dropped unless it has a letter or digit on
    both sides, so "A  Cat." -> "a cat", "(left)" -> "left", but "don't", "3.5" and "t-shirt" are kept
    whole. Tokens are what remains split on whitespace. It does not split contractions ("don't" stays
    one token where PTB gives "do n't"), so scores can differ slightly from the official COCO numbers.
    """
    text = text.lower()

    def keep_inside(m: re.Match[str]) -> str:
        s, e = m.start(), m.end()
        inside = s > 0 and e < len(text) and text[s - 1].isalnum() and text[e].isalnum()
        return m.group() if inside else " "

    return _SPACES.sub(" ", _PUNCT_RUN.sub(keep_inside, text)).strip()


def _checked(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[str], list[list[str]]]:
    """Validated and normalised copies of the inputs; ValueError with a one-line message otherwise."""
    # Every bad input is a ValueError (wrong types included), so that a caller catches one type.
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError(  # noqa: TRY004
            expected("a list of predictions and a list of reference lists", "a single string"))
    if len(predictions) != len(references):
        raise ValueError(expected("one list of references per prediction",
                                  f"{len(predictions)} predictions and {len(references)} reference lists"))
    if not predictions:
        raise ValueError(expected("at least one prediction", "none"))
    preds, refs = [], []
    for i, (p, rs) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise ValueError(expected(f"prediction {i} to be a string", type(p).__name__))  # noqa: TRY004
        if isinstance(rs, str) or not isinstance(rs, Sequence):
            raise ValueError(  # noqa: TRY004
                expected(f"a list of reference strings for prediction {i}", type(rs).__name__))
        if not rs:
            raise ValueError(expected(f"at least one reference for prediction {i}", "none"))
        normed = []
        for j, r in enumerate(rs):
            if not isinstance(r, str):
                raise ValueError(  # noqa: TRY004
                    expected(f"reference {j} of prediction {i} to be a string", type(r).__name__))
            n = normalise(r)
            if not n:
                what = f"reference {j} of prediction {i} to have words after normalisation"
                raise ValueError(expected(what, ascii(r[:40])))
            normed.append(n)
        preds.append(normalise(p))
        refs.append(normed)
    return preds, refs


def _exact_match(preds: list[str], refs: list[list[str]]) -> float:
    return sum(bool(p) and p in rs for p, rs in zip(preds, refs)) / len(preds)


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of predictions equal, after `normalise`, to any of their references."""
    return _exact_match(*_checked(predictions, references))


def vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The VQA accuracy: per question min(#references equal to the prediction / 3, 1), averaged.

    With VQA's ten human answers per question, an answer that three or more people gave scores 1 and
    one that k < 3 people gave scores k/3. With fewer than three references the threshold is their
    number, min(#equal / min(3, #references), 1), so with one reference per question this equals
    `exact_match`. Answers are compared after `normalise`. Not the official VQA script, which also maps
    number words to digits, drops articles, and averages the score over the ten leave-one-annotator-out
    subsets of nine answers (so it gives 0.9, not 1, for an answer exactly three people gave).
    """
    preds, refs = _checked(predictions, references)
    total = 0.0
    for p, rs in zip(preds, refs):
        if p:
            total += min(sum(r == p for r in rs) / min(3, len(rs)), 1.0)
    return total / len(preds)


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise LstError(
            f"BLEU and CIDEr need pycocoevalcap, which is not installed ({e}). {_INSTALL_HINT}") from None
    return Bleu, Cider


def _as_coco(preds: list[str], refs: list[list[str]]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """The (gts, res) dictionaries pycocoevalcap's scorers take: example id -> texts."""
    return dict(enumerate(refs)), {i: [p] for i, p in enumerate(preds)}


def _bleu(preds: list[str], refs: list[list[str]], n: int) -> dict[str, float]:
    Bleu, _ = _scorers()
    gts, res = _as_coco(preds, refs)
    scores, _ = Bleu(n).compute_score(gts, res, verbose=0)
    return {f"bleu_{k + 1}": float(s) for k, s in enumerate(scores)}


def _cider(preds: list[str], refs: list[list[str]]) -> float:
    _, Cider = _scorers()
    gts, res = _as_coco(preds, refs)
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> dict[str, float]:
    """Corpus-level BLEU-1..BLEU-n (n at most 4), as the COCO caption evaluation reports it.

    pycocoevalcap's Bleu: n-gram counts clipped by each example's references and summed over the whole
    corpus before the precisions are taken, the brevity penalty from the reference length closest to each
    prediction. No smoothing: an order with no matching n-gram in the whole corpus makes BLEU of that order
    and above close to 0 (the scorer adds 1e-15 to each count, so it is never exactly 0); identical texts
    score 1 - ~1e-9, not exactly 1, for the same reason.
    """
    if not 1 <= n <= BLEU_MAX_N:
        raise ValueError(expected(f"BLEU order n between 1 and {BLEU_MAX_N}", n))
    return _bleu(*_checked(predictions, references), n)


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D of the corpus, as the COCO caption evaluation reports it (pycocoevalcap's Cider).

    TF-IDF weighted 1..4-gram cosine similarity with clipping and a Gaussian length penalty (sigma 6),
    averaged over references and examples, times 10. The document frequencies come from the evaluated
    corpus's own references: an n-gram in every example's references weighs 0, so a one-example corpus
    always scores 0, and scores of small evaluation sets are noisy and not comparable across sets.
    """
    return _cider(*_checked(predictions, references))


def generation_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """exact_match, bleu_1..bleu_4 and cider: the keys a metrics.json carries for open-text targets."""
    preds, refs = _checked(predictions, references)
    return {"exact_match": _exact_match(preds, refs), **_bleu(preds, refs, BLEU_MAX_N),
            "cider": _cider(preds, refs)}
