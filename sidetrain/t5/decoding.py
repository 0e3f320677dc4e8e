"""Decoding with a T5 side network and its frozen T5, live: candidate scoring, greedy and beam search. Shared by
the seq2seq kind's model and the vision-language kind's VL-T5 model (pretrained.py in each).

Generation cannot run from a cache (the backbone decoder must see the generated tokens): each step re-runs the
backbone decoder and the side decoder on the whole prefix (simple, and exact; answers and captions are short).
`side_enc`, `side_mask`: the side encoder's output and mask (text, or text + image tokens); `enc_out`, `mask`:
the backbone encoder's output and the text mask, which the backbone decoder cross-attends to (it never sees
an image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import Seq2SeqLMOutput

from featcache.text.splits import pad_batch
from featcache.text.t5 import Seq2SeqBackbone, shift_right

from ..networks.t5 import T5LadderSideNetwork, sequence_scores
from ..recipe import autocast


@dataclass
class Encoded:
    """One batch of inputs through both encoders, what every decoding step reads."""

    side_enc: torch.Tensor  # (B, S, ds) side encoder output
    side_mask: torch.Tensor  # (B, S) bool
    enc_out: torch.Tensor  # (B, T, d) the backbone encoder's output (final layer norm applied)
    mask: torch.Tensor  # (B, T) bool, the text
    # (B,) the same number for rows with the same text: the backbone decoder (which never sees an image) then
    # runs once for all of them on a shared prefix (COCO: every image's "caption:"). None: every text distinct.
    text_id: list[int] | None = None


def same_text(input_ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """`Encoded.text_id` of a padded batch: the first row with the same real tokens."""
    seen: dict[tuple, int] = {}
    return [seen.setdefault(tuple(ids[m.bool()].tolist()), r) for r, (ids, m) in enumerate(zip(input_ids, mask))]


def side_states(model: T5LadderSideNetwork, backbone: Seq2SeqBackbone, s: dict[str, Any], targets: list[list[int]],
                row: torch.Tensor, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone decoder teacher-forced on `targets` (rows of examples `row`), then the side decoder: the states
    its LM head reads (N, U, d), and the target mask."""
    dec_ids, dec_mask = shift_right(targets, s["decoder_start_token_id"], s["pad_token_id"])
    # rows with the same text and target have the same backbone decoder states, whatever their images: one run
    texts = row.tolist() if enc.text_id is None else [enc.text_id[r] for r in row.tolist()]
    first: dict[tuple, int] = {}  # (text, target) -> its position among the rows the backbone runs
    keep, where = [], []
    for i, key in enumerate(zip(texts, map(tuple, targets))):
        if key not in first:
            first[key] = len(keep)
            keep.append(i)
        where.append(first[key])
    keep, where = torch.tensor(keep), torch.tensor(where)
    shared = row[keep.to(row.device)]
    dec_hidden, _ = backbone.decode(dec_ids[keep], dec_mask[keep], enc.enc_out[shared], enc.mask[shared].long(),
                                    s["decoder_layers"])
    dec_hidden = dec_hidden[where.to(dec_hidden.device)]
    dec_mask = dec_mask.bool().to(backbone.device)
    dec_hidden = (dec_hidden * dec_mask[..., None, None]).to(enc.side_enc.dtype)
    return model.decode(dec_hidden, dec_mask, enc.side_enc[row], enc.side_mask[row]), dec_mask


def side_logits(model, backbone, s, targets: list[list[int]], row: torch.Tensor, enc: Encoded):
    """`side_states` through the LM head: full-vocabulary logits (N, U, vocab), for a few rows only."""
    states, dec_mask = side_states(model, backbone, s, targets, row, enc)
    return model.logits(states), dec_mask


def candidate_scores(model, backbone, s, enc: Encoded) -> torch.Tensor:
    """(n, candidates) log-probability of every candidate label text, for each example."""
    cands = s["candidate_ids"]
    n, c = enc.side_enc.shape[0], len(cands)
    row = torch.arange(n, device=backbone.device).repeat_interleave(c)
    targets = [cands[k] for _ in range(n) for k in range(c)]
    states, dec_mask = side_states(model, backbone, s, targets, row, enc)
    target_t, _ = pad_batch(targets, 0)
    return sequence_scores(states, model.lm_head, target_t.to(states.device), dec_mask).view(n, c).float().cpu()


def classify(model, backbone, s, names: list[str], enc: Encoded) -> list[dict[str, Any]]:
    scores = candidate_scores(model, backbone, s, enc)
    best = scores.argmax(-1).tolist()
    return [{"label": names[k], "label_text": s["label_texts"][k], "scores": scores[i].tolist()}
            for i, k in enumerate(best)]


def teacher_forced(ladder, enc: Encoded, labels: torch.Tensor | None, decoder_input_ids: torch.Tensor | None,
                   decoder_attention_mask: torch.Tensor | None):
    """A T5 LadderModel's teacher-forced forward after its encoders (`ladder`: .t5, .side, .s, .options and
    side_inputs): `labels` (B, U), -100 at padding (the decoder input is them shifted right), or
    `decoder_input_ids` themselves -> Seq2SeqLMOutput (logits (B, U, vocab), the mean cross-entropy with labels)."""
    s, t5 = ladder.s, ladder.t5
    if decoder_input_ids is None:
        targets = [row[keep].tolist() for row, keep in zip(labels.cpu(), (labels != -100).cpu())]
        dec_ids, dec_mask = shift_right(targets, s["decoder_start_token_id"], s["pad_token_id"])
    else:
        dec_ids = decoder_input_ids
        dec_mask = torch.ones_like(dec_ids) if decoder_attention_mask is None else decoder_attention_mask
    dec_hidden, _ = t5.decode(dec_ids, dec_mask, enc.enc_out, enc.mask.long(), s["decoder_layers"])
    dec_mask = dec_mask.bool().to(t5.device)
    with autocast(ladder.options, ladder.device):
        states = ladder.side.decode(ladder.side_inputs(dec_hidden * dec_mask[..., None, None]),
                                    dec_mask.to(ladder.device), enc.side_enc, enc.side_mask)
        logits = ladder.side.logits(states).float()  # (B, U, vocab)
    loss = None
    if labels is not None:  # the teacher-forced cross-entropy training minimises, mean over real tokens
        loss = F.cross_entropy(logits.flatten(0, 1), labels.to(logits.device).flatten(), ignore_index=-100)
    return Seq2SeqLMOutput(loss=loss, logits=logits)


def next_token_log_probs(model, backbone, s, prefixes: list[list[int]], row: torch.Tensor,
                         enc: Encoded) -> torch.Tensor:
    """(N, vocab) log-probabilities of the token after each prefix (of example row[n])."""
    # the prefix plus a placeholder: shift_right turns it into [start] + prefix, whose last state we read
    states, _ = side_states(model, backbone, s, [p + [s["pad_token_id"]] for p in prefixes], row, enc)
    last = states[torch.arange(len(prefixes), device=states.device),
                  torch.tensor([len(p) for p in prefixes], device=states.device)]
    return torch.log_softmax(model.logits(last).float(), dim=-1)  # (N, vocab): one position per row only


def greedy(model, backbone, s, enc: Encoded, max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding: each example's generated ids, without the start token and the final EOS."""
    n = enc.side_enc.shape[0]
    row = torch.arange(n, device=backbone.device)
    made: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(max_new_tokens):
        logits = next_token_log_probs(model, backbone, s, made, row, enc)
        for i in range(n):
            if not done[i]:
                token = int(logits[i].argmax())
                done[i] = token == s["eos_token_id"]
                if not done[i]:
                    made[i].append(token)
        if all(done):
            break
    return made


def beam_search(model, backbone, s, enc: Encoded, max_new_tokens: int, num_beams: int,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search as transformers' generate runs it with early stopping: per example, `num_beams` hypotheses
    extended by the best 2 x num_beams next tokens; a hypothesis ending in EOS is finished, scored by its summed
    log-probability / length ** length_penalty; an example is done when it has num_beams finished ones. Returns
    each example's best finished hypothesis (else its best open one), without start token and EOS."""
    if num_beams == 1:
        return greedy(model, backbone, s, enc, max_new_tokens)
    eos = s["eos_token_id"]
    n = enc.side_enc.shape[0]
    beams: list[list[tuple[float, list[int]]]] = [[(0.0, [])] for _ in range(n)]  # open (score, ids) per example
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    for step in range(max_new_tokens):
        live = [i for i in range(n) if len(finished[i]) < num_beams and beams[i]]
        if not live:
            break
        prefixes = [ids for i in live for _, ids in beams[i]]
        row = torch.tensor([i for i in live for _ in beams[i]], device=backbone.device)
        logp = next_token_log_probs(model, backbone, s, prefixes, row, enc).cpu()
        at = 0
        for i in live:
            k = len(beams[i])
            scores = torch.tensor([b[0] for b in beams[i]])[:, None] + logp[at:at + k]  # (k, vocab)
            at += k
            top, where = scores.flatten().topk(2 * num_beams)
            vocab = scores.shape[1]
            kept: list[tuple[float, list[int]]] = []
            for rank, (value, flat) in enumerate(zip(top.tolist(), where.tolist())):
                beam, token = divmod(flat, vocab)
                ids = beams[i][beam][1]
                if token == eos:
                    if rank < num_beams and len(finished[i]) < num_beams:  # an EOS outside the top k: dropped
                        finished[i].append((value / max(len(ids) + 1, 1) ** length_penalty, ids))
                else:
                    kept.append((value, ids + [token]))
                if len(kept) == num_beams:
                    break
            beams[i] = kept
    out = []
    for i in range(n):
        if finished[i]:
            out.append(max(finished[i], key=lambda h: h[0])[1])
        else:
            out.append(max(beams[i], key=lambda h: h[0] / max(len(h[1]), 1) ** length_penalty)[1])
    return out
