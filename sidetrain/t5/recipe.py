"""The Recipe of a T5 text part for the shared training loop: the T5 side network, cached or live batches
(data.py), teacher-forced cross-entropy on the gold target's text, and classification by scoring every
candidate label text (sum of log-probabilities), from the cache on the eval splits. The seq2seq kind uses it
as is; the vision-language kind over a T5 text backbone passes its own network (image tokens appended to the
side encoder) and batch sources (the text part's batches with the image tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featcache.errors import StoreError, TrainConfigError, expected
from featcache.reader import SplitReader, StoreReader
from featcache.store import check_match
from featcache.text.t5 import Seq2SeqBackbone, load_seq2seq_backbone

from .. import metrics as M
from ..data import length_bucketed_batches
from ..kinds.base import SearchFacts
from ..networks.ladders import stored_blocks
from ..networks.side_config import SideConfig
from ..networks.t5 import T5LadderSideNetwork, reduction_rule, sequence_scores, target_loss
from ..recipe import (
    RUN_MANIFEST_KEYS,
    Recipe,
    backbone_config,
    labelled_splits,
    resolved_config,
    select_metric,
)
from ..text_metrics import generation_scores
from .data import CachedSeq2Seq, OnlineSeq2Seq, Seq2SeqBatch, open_decoder
from .generation_eval import generate_split, reference_groups

if TYPE_CHECKING:
    from ..config import TrainConfig

GENERATE = "generate"  # a store's task type for free-text targets (featcache/text/t5_part.py)
FROZEN = ("lm_head", "encoder_relative_bias", "decoder_relative_bias")  # kept in the store by stage 1
# (side network, backbone) -> None: the side blocks start as the backbone's, Fisher-pruned (kind.py wires it)
PrunedInit = Callable[[T5LadderSideNetwork, Seq2SeqBackbone], None]


def store_weights(store: StoreReader) -> dict[str, torch.Tensor]:
    """The frozen backbone pieces the side network needs (LM head, relative-position biases)."""
    weights = store.frozen_weights()
    missing = [k for k in FROZEN if k not in weights]
    if missing:
        raise StoreError(expected(f"frozen backbone weights {list(FROZEN)} in the T5 store", f"none of {missing}",
                                  "Re-extract the store with this lst."))
    return {k: torch.from_numpy(weights[k]) for k in FROZEN}


def build_seq2seq_model(cfg: TrainConfig, manifest: dict[str, Any], weights: dict[str, torch.Tensor],
                        decoder_layers: list[int] | None = None, network: type = T5LadderSideNetwork,
                        **extra: Any) -> T5LadderSideNetwork:
    """The T5 side network `cfg` trains, or a run's (`lst predict`). Layer dropping: --layers keeps the same
    block indices in both stacks; `decoder_layers`: the decoder's kept layers as a run recorded them.
    `weights`: the frozen LM head and, where block 0 starts from them, the backbone's relative biases
    (`store_weights`; a trained run's come with its own weights)."""
    s = manifest["seq2seq"]
    encoder = SideConfig.resolve(cfg, int(manifest["task"]["num_labels"]), s["encoder_layers"])
    decoder = encoder.restacked(s["decoder_layers"], cfg.layers if decoder_layers is None else decoder_layers)
    biases = {part: weights[f"{part}_relative_bias"] for part in ("encoder", "decoder")
              if f"{part}_relative_bias" in weights}
    return network(backbone_config(manifest), weights["lm_head"], s["scale_decoder_outputs"], biases,
                   encoder, decoder, **extra)


def t5_search_facts(manifest: dict[str, Any]) -> SearchFacts:
    """What `lst sweep` needs for a store with a T5 text part."""
    config = backbone_config(manifest)
    factors, rule = reduction_rule(config)
    s = manifest["seq2seq"]
    # one --layers for both stacks: the stored blocks of both
    blocks = [x for x in stored_blocks(s["encoder_layers"]) if x in s["decoder_layers"]]
    return SearchFacts(int(config.d_model), int(config.num_heads), tuple(factors), rule, tuple(blocks),
                       stackable=False)


@torch.no_grad()
def predict_split(model: T5LadderSideNetwork, source, split: SplitReader, batch_size: int,
                  device: torch.device) -> np.ndarray:
    """The best-scoring candidate label of every example, in the split's order."""
    model.eval()
    out = np.zeros(len(split), dtype=np.int64)
    for idx in length_bucketed_batches(split.lengths, batch_size * 2, seed=0, epoch=0, shuffle=False):
        b = source(idx).to(device)
        states = model(*b.side_inputs())
        scores = sequence_scores(states, model.lm_head, b.targets, b.dec_mask).view(len(idx), -1)  # (B, C)
        out[idx] = scores.argmax(-1).cpu().numpy()
    return out


def sources(cfg: TrainConfig, store: StoreReader, backbone: Seq2SeqBackbone | None) -> dict[str, Any]:
    """One batch source per labelled split: the store, or the live backbone for --online."""
    names = labelled_splits(store)
    decs = {n: open_decoder(store, n) for n in names}
    if not cfg.online:
        return {n: CachedSeq2Seq(store.split(n), decs[n], cfg.preload, cfg.memory_budget) for n in names}
    return {n: OnlineSeq2Seq(store.split(n), decs[n], backbone, store.manifest) for n in names}


def check_options(cfg: TrainConfig) -> None:
    """Options of the encoder-only trainer that have no meaning for T5 side networks."""
    if cfg.side_heads is not None:
        raise TrainConfigError(expected("the backbone's head count for T5 side blocks (it carries the relative "
                                        "position bias)", f"--side-heads {cfg.side_heads}", "Drop --side-heads."))
    if cfg.top != "side":
        raise TrainConfigError(expected("--top side for T5 (its side decoder feeds the frozen LM head; there is no "
                                        "classifier for the backbone's states to join)", f"--top {cfg.top}"))
    if cfg.label_smoothing:
        raise TrainConfigError(expected("--label-smoothing 0 for T5 (its loss is the target text's cross-entropy)",
                                        cfg.label_smoothing))


def t5_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, eval_name: str | None,
              pruned_init: PrunedInit, build: Callable[[], T5LadderSideNetwork] | None = None,
              make_sources: Callable[[Seq2SeqBackbone | None], dict[str, Any]] | None = None,
              run_keys: tuple[str, ...] = (*RUN_MANIFEST_KEYS, "seq2seq"),
              group_key: Callable[[str], np.ndarray | None] | None = None) -> Recipe:
    """The T5 side network, cached or live batches, the teacher-forced loss and candidate scoring (or, for
    free-text targets, generation: generation_eval.py). `pruned_init` runs for --init pruned, with the live
    backbone. `build`: the side network (default: the text-only one); `make_sources(backbone)`: batch sources
    per labelled split (default: the text part's; `backbone` is the live T5 for --online, else None);
    `run_keys`: manifest fields RUN/config.json records; `group_key(split)`: per row, what besides its text
    makes two rows the same input (their images), for grouping the references of generated targets."""
    check_options(cfg)
    manifest = store.manifest
    generate = manifest["task"]["type"] == GENERATE
    metric = generation_metric(cfg) if generate else select_metric(cfg, manifest, "classification")
    if cfg.train_split != manifest["seq2seq"]["train_split"]:
        raise TrainConfigError(expected(f"--train-split {manifest['seq2seq']['train_split']} (the split whose gold "
                                        "targets were decoded)", cfg.train_split))
    model = build() if build is not None else build_seq2seq_model(cfg, manifest, store_weights(store))
    backbone = None
    if cfg.init == "pruned" or cfg.online or generate:  # generated targets are scored with the decoder live
        backbone = load_seq2seq_backbone(manifest["backbone"]["name"], "fp32", str(device))
        check_match("backbone weights", manifest["backbone"]["revision"], backbone.revision)
    if cfg.init == "pruned":
        pruned_init(model, backbone)
    model = model.to(device)
    batches = (make_sources or (lambda live: sources(cfg, store, live)))(backbone)
    resolved = resolved_config(cfg, manifest, metric, eval_name, tuple(k for k in run_keys if k in manifest),
                               layers=model.enc_kept, decoder_layers=model.dec_kept)

    def loss(forward, b: Seq2SeqBatch) -> torch.Tensor:
        return target_loss(forward(*b.side_inputs()), model.lm_head, b.targets, b.dec_mask)

    if generate:
        return generation_recipe(cfg, store, device, model, backbone, batches, metric, resolved, loss, group_key)

    def predict(name: str, amp) -> np.ndarray:
        with amp or contextlib.nullcontext():
            return predict_split(model, batches[name], store.split(name), cfg.batch_size, device)

    return Recipe(model, batches, "classification", metric, manifest["task"]["num_labels"], resolved, loss, predict)


def generation_metric(cfg: TrainConfig) -> str:
    """--metric for free-text targets: exact match (default), BLEU or CIDEr."""
    metric = cfg.metric or "exact_match"
    if metric not in M.GENERATION:
        raise TrainConfigError(expected(f"a --metric for generated text ({', '.join(M.GENERATION)})", metric))
    return metric


def generation_recipe(cfg: TrainConfig, store: StoreReader, device: torch.device, model: T5LadderSideNetwork,
                      backbone: Seq2SeqBackbone, batches: dict[str, Any], metric: str, resolved: dict[str, Any],
                      loss, group_key) -> Recipe:
    """Free-text targets: the same teacher-forced loss; every evaluation split scored by generating (greedy, or
    beam search with --eval-beams)."""
    s = store.manifest["seq2seq"]
    groups = {n: reference_groups(store.split(n), open_decoder(store, n), backbone.tokenizer,
                                  group_key(n) if group_key else None, s["eos_token_id"])
              for n in batches if n != cfg.train_split}

    def predict(name: str, amp) -> np.ndarray:
        with amp or contextlib.nullcontext():
            return generate_split(model, backbone, s, store.split(name), batches[name], groups[name], cfg.batch_size,
                                  device, cfg.eval_beams)

    def scores(name: str, pred: np.ndarray) -> dict[str, float]:
        return generation_scores([str(p) for p in pred], groups[name].references)

    return Recipe(model, batches, GENERATE, metric, 1, resolved, loss, predict, scores)
