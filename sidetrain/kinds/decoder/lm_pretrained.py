"""A decoder run trained through the LM head, as one model (`DecoderLMLadderModel`): the frozen causal LM, live,
and the side network (lm_model.py). Label scoring runs each prompt + candidate text as training did; generation
decodes greedily with the backbone live (it cannot run from a cache: each new token needs the backbone's states),
keeping a KV cache for the backbone (transformers' own) and for the side network (its family model's own), so a
step runs one token through each. `use_cache=False` recomputes the whole sequence at every step instead (the
same tokens; a test holds them equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.modeling_outputs import CausalLMOutput

from featcache.errors import LstError, expected
from featcache.kinds.decoder.backbone import CausalBackbone, load_causal_lm
from featcache.kinds.decoder.lm_head import frozen_top
from featcache.store import check_match
from featcache.text.splits import pad_batch

from ...pretrained import LadderModel, text_lines
from ...recipe import autocast
from .data import target_positions
from .lm_model import target_log_probs
from .lm_recipe import LABELS, build_lm_model

POSITION_FIELDS = ("max_position_embeddings", "n_positions")


class DecoderLMLadderModel(LadderModel):
    """`model(input_ids, attention_mask, labels)` -> CausalLMOutput (next-token logits at every position, the loss
    of `labels` shifted as transformers' causal LMs take them); `generate(input_ids)` greedy, KV-cached;
    `predict(texts)` -> the best label text's label (a label-scoring run) or the generated text (a free-text run,
    or `generate=True`)."""

    pipeline_task = "text2text-generation"

    def __init__(self, folder: Path, config: dict[str, Any], device: torch.device,
                 backbone: CausalBackbone | None = None) -> None:
        super().__init__(folder, config)
        facts = self.manifest["backbone"]
        self.causal = backbone or load_causal_lm(facts["name"], self.manifest.get("precision", "fp32"), str(device))
        check_match("backbone weights", facts["revision"], self.causal.revision)
        self.backbone = self.causal.lm  # a submodule: `.to()` moves it with the side network
        self.tokenizer = self.causal.tokenizer
        self.targets = self.manifest["decoder"]["targets"]
        self.scores_labels = self.targets["mode"] == LABELS
        self.pipeline_tasks = ("text2text-generation", "text-classification") if self.scores_labels else (
            "text2text-generation",)
        weights = {k: torch.from_numpy(v) for k, v in frozen_top(self.causal).items()}  # the live LM's own
        self.side = build_lm_model(self.options, self.manifest, weights)
        self.side.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
        self.side.to(device)
        config_ = self.causal.config
        self.positions = next((int(v) for f in POSITION_FIELDS if isinstance(v := getattr(config_, f, None), int)),
                              None)

    def frozen_parts(self) -> list[Any]:
        return [self.causal]

    def can_generate(self) -> bool:
        return True

    # ------------------------------------------------------------------ inputs

    def tokenize(self, texts: list) -> list[list[int]]:
        """Prompts as extraction tokenised them (pairs split on a tab); never cut: a prompt longer than the run's
        --max-length is refused, as extraction refused it."""
        lines = text_lines(texts)
        split = [line.split("\t", 1) for line in lines]
        pairs = [p[1] for p in split] if any(len(p) > 1 for p in split) else None
        if pairs is not None and any(len(p) < 2 for p in split):
            raise LstError(expected("every line to hold a pair (text<TAB>text) or none to", "a mix"))
        ids = self.tokenizer([p[0] for p in split], pairs, truncation=False, verbose=False)["input_ids"]
        limit = int(self.manifest["max_length"])
        for i, x in enumerate(ids):
            if not 0 < len(x) <= limit:
                raise LstError(expected(f"prompts of 1..{limit} tokens (the run's --max-length)",
                                        f"text {i + 1} of {len(x)} tokens",
                                        "Shorten it, or extract and train with a larger --max-length."))
        return [list(x) for x in ids]

    def preprocess(self, texts: list) -> dict[str, torch.Tensor]:
        ids = self.tokenize(texts)
        input_ids, mask = pad_batch(ids, 0)
        return {"input_ids": input_ids, "attention_mask": mask}

    def states(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The live backbone's stored layers over right-padded rows, padding zeroed as the store has it, on the
        side network's device and dtype: (N, T, L, d) and the (N, T) mask."""
        ids, mask = pad_batch(seqs, 0)
        hidden = self.causal.hidden_states(ids, mask, None, self.manifest["layers"])
        mask = mask.bool().to(hidden.device)
        return self.side_inputs(hidden * mask[..., None, None]), mask.to(self.device)

    # ------------------------------------------------------------------ scoring and the forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: Any) -> CausalLMOutput:
        """Right-padded `input_ids` (B, T): logits (B, T, vocab), position t predicting token t + 1."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        seqs = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
        hidden, mask = self.states(seqs)
        with autocast(self.options, self.device):
            x = self.side(hidden, mask, mask)  # (M, d): every real position
            logits = torch.zeros((*mask.shape, self.side.frozen.lm_head.shape[0]), device=self.device)
            logits[mask] = self.side.logits(x)
        out_loss = None
        if labels is not None:
            out_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].to(self.device).flatten(),
                                       ignore_index=-100)
        return CausalLMOutput(loss=out_loss, logits=logits)

    @torch.no_grad()
    def logits(self, texts: list, batch_size: int = 32) -> np.ndarray:
        """(N, labels) summed log-probability of each label's text after each prompt (label-scoring runs)."""
        if not self.scores_labels:
            raise LstError(expected("a label-scoring run (extracted with --label-text) for label scores",
                                    "a free-text run", "Use generate_texts() or predict()."))
        cands = self.targets["candidate_ids"]
        ids, c = self.tokenize(texts), len(cands)
        out = np.zeros((len(ids), c), dtype=np.float32)
        step = max(1, batch_size // c)
        for a in range(0, len(ids), step):
            prompts = ids[a:a + step]
            targets = [cands[k] for _ in prompts for k in range(c)]
            hidden, mask = self.states([p + t for p in prompts for t in cands])
            plen = torch.tensor([len(p) for p in prompts]).repeat_interleave(c)
            at, nxt = target_positions(plen, targets, mask.shape[1])
            at = at.to(self.device)
            with autocast(self.options, self.device):
                lp = target_log_probs(self.side(hidden, mask, at), self.side.frozen, nxt.to(self.device))
            scores = torch.zeros(len(targets), device=self.device).index_add_(0, at.nonzero()[:, 0], lp.float())
            out[a:a + len(prompts)] = scores.view(len(prompts), c).cpu().numpy()
        return out

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new_tokens: int = 16, use_cache: bool = True) -> list[int]:
        """One prompt's greedy continuation, without the final EOS. It stops at EOS, after `max_new_tokens`, or at
        the backbone's last position."""
        eos, layers = int(self.targets["eos_token_id"]), self.manifest["layers"]
        room = max_new_tokens if self.positions is None else min(max_new_tokens, self.positions - len(prompt))
        made: list[int] = []
        backbone_cache = side_cache = None
        if use_cache:
            backbone_cache, side_cache = self.causal.new_cache(), self.side.new_cache()
        new = list(prompt)
        for _ in range(max(0, room)):
            if use_cache:  # the new tokens only, attending to the cached ones
                hidden = self.side_inputs(self.causal.step(torch.tensor([new]), backbone_cache, layers))
                mask = torch.ones((1, len(prompt) + len(made)), dtype=torch.bool, device=self.device)
            else:  # the whole sequence again
                hidden, mask = self.states([prompt + made])
            at = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=self.device)
            at[0, -1] = True
            with autocast(self.options, self.device):
                token = int(self.side.logits(self.side(hidden, mask, at, cache=side_cache)).argmax(-1))
            if token == eos:
                break
            made.append(token)
            new = [token]
        return made

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 16,
                 use_cache: bool = True, **_: Any) -> torch.Tensor:
        """Greedy decoding of each right-padded row (B, T) -> (B, T' ) its prompt, the generated tokens and EOS
        where one was produced, right-padded with 0 (rows are decoded one at a time: no padding inside a row)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = []
        for row, m in zip(input_ids.cpu(), mask.cpu()):
            prompt = row[m.bool()].tolist()
            made = self.greedy(prompt, max_new_tokens, use_cache)
            ended = len(made) < max_new_tokens and (self.positions is None
                                                    or len(prompt) + len(made) < self.positions)
            rows.append(prompt + made + ([int(self.targets["eos_token_id"])] if ended else []))
        return pad_batch(rows, 0)[0]

    @torch.no_grad()
    def generate_texts(self, texts: list, max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
        return [self.tokenizer.decode(self.greedy(p, max_new_tokens), skip_special_tokens=True)
                for p in self.tokenize(texts)]

    def predict(self, texts: list, batch_size: int = 32, generate: bool = False, max_new_tokens: int = 16) -> list[str]:
        """The best label text's label of each text (label-scoring runs), or its generated text (free-text runs,
        or `generate`)."""
        if generate or not self.scores_labels:
            return self.generate_texts(list(texts), max_new_tokens, batch_size)
        return super().predict(texts, batch_size)

    def predict_lines(self, lines: list[str], generate: bool = False, num_beams: int = 1) -> list[str]:
        self.check_beams(num_beams)
        return self.predict(lines, generate=generate)
