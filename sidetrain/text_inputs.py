"""Raw text at prediction time, as the store saw it at extraction: tokenised with the backbone's tokenizer
(pairs split on a tab, the same max length) and run through the live text backbone, padded as the store
pads. Shared by the kinds that predict from a text encoder (encoder, vision_language)."""

from __future__ import annotations

import numpy as np
import torch

from featcache.errors import LstError, expected


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """As `lst extract` did: same tokenizer, pairs split on a tab, same max length."""
    firsts, seconds = zip(*[(t.split("\t", 1) + [None])[:2] for t in texts]) if texts else ((), ())
    pairs = list(seconds) if any(s is not None for s in seconds) else None
    if pairs is not None and any(s is None for s in pairs):
        raise LstError(expected("every line to hold a pair (text<TAB>text) or none to", "a mix"))
    enc = tokenizer(list(firsts), pairs, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
    return enc["input_ids"], types


def text_states(backbone, ids: list[list[int]], types: list[list[int]], idx: np.ndarray,
                layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The live backbone's states of examples `idx`, padded to the longest with padding zeroed (as the store
    has it), and their (B, T) mask."""
    lengths = torch.as_tensor([len(ids[i]) for i in idx])
    t = int(lengths.max())
    input_ids = torch.zeros(len(idx), t, dtype=torch.long)
    type_ids = torch.zeros(len(idx), t, dtype=torch.long)
    for row, i in enumerate(idx):
        input_ids[row, :lengths[row]] = torch.tensor(ids[i])
        type_ids[row, :lengths[row]] = torch.tensor(types[i])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    hidden = backbone.hidden_states(input_ids, mask.long(), type_ids, layers)
    return hidden * mask.to(hidden.device)[..., None, None], mask
