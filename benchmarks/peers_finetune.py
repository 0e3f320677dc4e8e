"""The peers of LST for benchmarks/bench_peers.py: full fine-tuning, or LoRA through PEFT, in a plain PyTorch loop.

    python benchmarks/peers_finetune.py MODEL DATA --method lora --lr 2e-3 [--epochs 3] [--lora-targets query,value]

MODEL: a local transformers encoder folder (never downloaded). DATA: a folder of split files, read by the
same reader as `lst extract` (featcache.sources), so both see the same rows and columns. The model is
AutoModelForSequenceClassification (its head on the pooled first token, as transformers builds it); AdamW;
batch 32, max length 64, length-bucketed batches (as `lst train` has them, so padding costs both the
same), linear warm-up over the first 10% of the steps and linear decay to 0; evaluated on the model
selection split after every epoch, the other splits scored at the best epoch. Prints `LOADED` once the
model and the tokenised splits are in memory (the parent reads the RSS then), and one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

EVAL_SPLITS = ("dev", "validation", "valid", "val")


def read_splits(data: Path, quoting: str) -> tuple[dict[str, list], dict[str, np.ndarray], str, list]:
    """Texts (or text pairs) and labels per split, the task and the label names, as lst extract reads them."""
    from featcache.text.sources import Quoting, load_dataset_path, resolve_columns

    dataset = load_dataset_path(data, Quoting(quoting))
    cols = resolve_columns(dataset, None, None, None)
    raw = {name: t.frame[cols.label].astype(str).tolist() for name, t in dataset.splits.items()}
    values = [v for vs in raw.values() for v in vs]
    regression = all(_is_float(v) for v in values) and any("." in v for v in values)  # featcache/plan.py's rule
    names = [] if regression else sorted(set(raw["train"]))
    index = {n: i for i, n in enumerate(names)}
    texts, labels = {}, {}
    for name, table in dataset.splits.items():
        frame = table.frame
        first = frame[cols.text].astype(str).tolist()
        texts[name] = list(zip(first, frame[cols.pair].astype(str).tolist())) if cols.pair else first
        labels[name] = (np.array([float(v) for v in raw[name]], dtype=np.float32) if regression
                        else np.array([index.get(v, -1) for v in raw[name]], dtype=np.int64))
    return texts, labels, "regression" if regression else "classification", names


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: random.Random) -> list[np.ndarray]:
    """Shuffled batches of similar lengths: sort within chunks of 50 batches, then shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = 50 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [np.array(part[i:i + batch_size]) for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def build_model(args, num_labels: int, regression: bool):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=num_labels, problem_type="regression" if regression else None, local_files_only=True)
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        # SEQ_CLS keeps the classification head (and the pooler, if any) trainable beside the adapters
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=args.lora_r, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout, target_modules=args.lora_targets.split(","))
        model = get_peft_model(model, config)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--method", choices=["full", "lora"], required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-fraction", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--lora-targets", default="query,value", help="module names that get adapters")
    p.add_argument("--quoting", default="auto", help="as lst extract --quoting")
    p.add_argument("--metric", required=True, help="model selection metric (sidetrain.metrics names)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke runs)")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from sidetrain.metrics import compute

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    texts, labels, task, names = read_splits(Path(args.data), args.quoting)
    regression = task == "regression"
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    encoded = {}
    for split, xs in texts.items():
        pairs = isinstance(xs[0], tuple)
        enc = tokenizer([x[0] for x in xs] if pairs else xs, [x[1] for x in xs] if pairs else None,
                        truncation=True, max_length=args.max_length)
        encoded[split] = enc
    model = build_model(args, 1 if regression else len(names), regression)
    trainable = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in trainable)
    print("LOADED", flush=True)
    time.sleep(0.5)  # the parent samples the loaded RSS on reading LOADED: before training allocates more

    lengths = np.array([len(x) for x in encoded["train"]["input_ids"]])
    steps_per_epoch = -(-len(lengths) // args.batch_size)
    total = steps_per_epoch * args.epochs if not args.max_steps else min(args.max_steps, steps_per_epoch * args.epochs)
    warmup = int(total * args.warmup_fraction)
    optim = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))

    def batch(split: str, idx: np.ndarray) -> dict[str, torch.Tensor]:
        enc = encoded[split]
        feats = [{k: enc[k][i] for k in enc} for i in idx]
        return tokenizer.pad(feats, return_tensors="pt")

    @torch.no_grad()
    def evaluate(split: str) -> dict[str, float]:
        model.eval()
        n = len(labels[split])
        order = np.argsort([len(x) for x in encoded[split]["input_ids"]], kind="stable")
        preds = np.empty(n, dtype=np.float32 if regression else np.int64)
        for s in range(0, n, 128):
            idx = order[s:s + 128]
            logits = model(**batch(split, idx)).logits
            preds[idx] = logits[:, 0].numpy() if regression else logits.argmax(-1).numpy()
        return compute(task, preds, labels[split], len(names))

    eval_split = next(s for s in EVAL_SPLITS if s in encoded)
    history, best, best_state, step, losses = [], -np.inf, None, 0, []
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for idx in bucketed_batches(lengths, args.batch_size, rng):
            inputs = batch("train", idx)
            target = torch.from_numpy(labels["train"][idx])
            loss = model(**inputs, labels=target).loss
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optim.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        seconds = time.perf_counter() - t0
        scores = evaluate(eval_split)
        record = {"epoch": epoch + 1, "seconds": seconds, "train_loss": float(np.mean(losses[-steps_per_epoch:])),
                  **{f"eval_{k}": v for k, v in scores.items()}}
        history.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
        if scores[args.metric] > best:
            best = scores[args.metric]
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                          if k in {n for n, q in model.named_parameters() if q.requires_grad}}
        if step >= total:
            break
    model.load_state_dict(best_state, strict=False)
    splits = {s: evaluate(s) for s in encoded if s != "train"}
    result = {"method": args.method, "lr": args.lr, "epochs": len(history), "metric": args.metric,
              "eval_split": eval_split, "best_eval": best, "splits": splits, "history": history,
              "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])),
              "train_seconds": float(sum(h["seconds"] for h in history)), "steps": step,
              "trainable_parameters": n_trainable, "total_parameters": sum(q.numel() for q in model.parameters()),
              "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                       "targets": args.lora_targets} if args.method == "lora" else None}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
