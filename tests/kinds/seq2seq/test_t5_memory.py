"""T5 candidate scores and the training loss in bounded memory: the logits of at most CHUNK_TOKENS target
tokens exist at a time, with the same results as full (N, U, vocab) logits (issue #16).

Measured on a tiny T5 (d=32, vocab 30522) store of 400 train / 200 dev banking77 rows (77 candidate
label texts of up to 17 tokens), `train(TrainConfig(epochs=1, batch_size=8, reduction_factor=4,
device="cpu"))` in a fresh process, ru_maxrss: 5.35 GiB with full logits, 0.86 GiB chunked (batch 32:
0.94 GiB chunked; full logits would need ~4x the batch-8 logits, ~20 GiB). Same predictions and losses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sidetrain.networks.t5 import CHUNK_TOKENS, sequence_scores, target_log_probs, target_loss

VOCAB, D = 30522, 32  # the tests' tiny T5: MiniLM's vocabulary


def _batch(n: int = 40, u: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = 0.3 * torch.randn(n, u, D, generator=g)  # logits of std ~1.7, as a trained head gives
    lm_head = torch.randn(VOCAB, D, generator=g)
    targets = torch.randint(0, VOCAB, (n, u), generator=g)
    lengths = torch.randint(1, u + 1, (n,), generator=g)
    mask = torch.arange(u)[None, :] < lengths[:, None]
    return states, lm_head, targets.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("chunk", [1, 7, 64, CHUNK_TOKENS])
def test_chunked_scores_equal_full_logits(chunk):
    states, lm_head, targets, mask = _batch()
    full = torch.log_softmax((states @ lm_head.T).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(target_log_probs(states, lm_head, targets, mask, chunk), full * mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sequence_scores(states, lm_head, targets, mask, chunk), (full * mask).sum(-1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [16, CHUNK_TOKENS])  # 16: chunks recomputed in backward; 1024: one cross_entropy
def test_chunked_loss_and_gradient_equal_full_logits(chunk):
    states, lm_head, targets, mask = _batch()
    a, b = states.clone().requires_grad_(), states.clone().requires_grad_()
    full = F.cross_entropy((b @ lm_head.T).float()[mask], targets[mask])
    full.backward()
    loss = target_loss(a, lm_head, targets, mask, chunk)
    loss.backward()
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


PEAK = """
import resource, sys, torch
torch.set_num_threads(1)
from sidetrain.networks.t5 import sequence_scores, target_loss
n, u, d, vocab = 2500, 8, 32, 30522  # 20k target tokens: full logits would be 2.3 GiB, log_softmax as much again
states, lm_head = torch.randn(n, u, d), torch.randn(vocab, d)
targets, mask = torch.randint(0, vocab, (n, u)), torch.ones(n, u, dtype=torch.bool)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    sequence_scores(states, lm_head, targets, mask)
scoring = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
target_loss(states.requires_grad_(), lm_head, targets, mask).backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((scoring - before) // 1024, (after - before) // 1024)  # MiB above the inputs
"""


def test_scoring_and_loss_peak_memory_is_bounded_by_the_chunk():
    """In a fresh process (ru_maxrss is a high-water mark): scoring and a loss + backward over 20k target
    tokens stay within a few chunks of logits (CHUNK_TOKENS x vocab fp32 = 119 MiB), not 2 x 2.3 GiB."""
    root = str(Path(__file__).resolve().parents[3])
    out = subprocess.run([sys.executable, "-c", PEAK], check=False, capture_output=True, text=True, timeout=300,
                         cwd=root, env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    scoring_mib, loss_mib = map(int, out.stdout.split()[-2:])
    assert scoring_mib < 600 and loss_mib < 800, (scoring_mib, loss_mib)
