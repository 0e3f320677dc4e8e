"""What a smaller store or a cheaper backbone costs: measured error against float32, on a sample.

Two numbers go into the manifest (key `fidelity`):
- storage error: the computed states against what each storage dtype gives back after encode/decode;
- precision drift: the backbone at --precision against the same backbone in float32.
Both are relative error ||approx - ref|| / ||ref|| (overall and per layer) and the cosine of each
token's vector (mean and min), over the real tokens of a few examples.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from . import store as S

log = logging.getLogger(__name__)

DRIFT_WARNING = 0.05  # relative error above which a compute precision is called lossy


def compare(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, Any]:
    """reference, approx: (N, L, d) real tokens. Error numbers rounded for a readable manifest."""
    ref, app = reference.double(), approx.double()
    diff = app - ref
    per_layer = diff.norm(dim=(0, 2)) / ref.norm(dim=(0, 2)).clamp_min(1e-30)  # (L,)
    cos = torch.nn.functional.cosine_similarity(app, ref, dim=-1, eps=1e-30)  # (N, L)
    return {"rel_error": _r(diff.norm() / ref.norm().clamp_min(1e-30)),
            "rel_error_per_layer": [_r(x) for x in per_layer],
            "cosine_mean": _r(cos.mean()), "cosine_min": _r(cos.min())}


def _r(x: torch.Tensor | float) -> float:
    return float(f"{float(x):.4g}")


def sample_indices(n_examples: int, n: int) -> list[int]:
    """`n` examples spread evenly over the split (deterministic)."""
    if n <= 0 or n_examples == 0:
        return []
    return sorted(set(np.linspace(0, n_examples - 1, num=min(n, n_examples)).round().astype(int).tolist()))


def real_token_states(backbone, input_ids: list[list[int]], token_type_ids: list[list[int]], layers: list[int],
                      batch_size: int) -> torch.Tensor:
    """States of the real tokens of the given examples, concatenated: (N_tokens, L, d) float32."""
    pad_id = backbone.tokenizer.pad_token_id or 0
    # Length-sorted small batches: a sample spread over the split pads badly in one big batch, and
    # that padding cost more than the measurement itself (~10% of a small extraction's time).
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    input_ids, token_type_ids = [input_ids[i] for i in order], [token_type_ids[i] for i in order]
    batch_size = min(batch_size, 8)
    out = []
    for b in range(0, len(input_ids), batch_size):
        ids_b, types_b = input_ids[b:b + batch_size], token_type_ids[b:b + batch_size]
        width = max(len(x) for x in ids_b)
        ids = torch.full((len(ids_b), width), pad_id, dtype=torch.long)
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for r, (x, t) in enumerate(zip(ids_b, types_b)):
            ids[r, :len(x)], types[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(t), 1
        states = backbone.hidden_states(ids, mask, types, layers)  # (B, T, L, d)
        out.append(states[mask.bool()])
    return torch.cat(out)


def storage_error(states: torch.Tensor) -> dict[str, dict[str, Any]]:
    """Per storage dtype: stored-and-read-back values against the computed float32 ones."""
    result = {}
    for dtype in S.STORE_DTYPES:
        values, scales = S.encode_scaled(states, dtype)
        result[dtype] = compare(states, S.decode(values, dtype, scales))
    return result


def measure(backbone, input_ids: list[list[int]], token_type_ids: list[list[int]], layers: list[int],
            store_dtype: str, batch_size: int, load_fp32=None) -> dict[str, Any]:
    """The `fidelity` manifest entry. `load_fp32()` returns the fp32 backbone (only for --precision != fp32)."""
    states = real_token_states(backbone, input_ids, token_type_ids, layers, batch_size)
    result: dict[str, Any] = {"examples": len(input_ids), "tokens": int(states.shape[0]),
                              "storage_error": storage_error(states), "precision": backbone.precision}
    for dtype in ("fp16", "bf16", "int8"):
        log.info("storage %s: relative error %.2e, min cosine %.6f", dtype,
                 result["storage_error"][dtype]["rel_error"], result["storage_error"][dtype]["cosine_min"])
    if backbone.precision != "fp32" and load_fp32 is not None:
        reference = real_token_states(load_fp32(), input_ids, token_type_ids, layers, batch_size)
        result["precision_drift"] = compare(reference, states)
        values, scales = S.encode_scaled(states, store_dtype)
        result["total_error"] = compare(reference, S.decode(values, store_dtype, scales))  # what stage 2 reads
        drift = result["precision_drift"]["rel_error"]
        if drift > DRIFT_WARNING:
            log.warning("--precision %s moves the hidden states by %.1f%% (relative error against fp32, "
                        "min cosine %.4f); this is recorded in the manifest. Use fp32 or bf16 for a faithful cache.",
                        backbone.precision, 100 * drift, result["precision_drift"]["cosine_min"])
        else:
            log.info("--precision %s drift against fp32: relative error %.2e", backbone.precision, drift)
    return result
