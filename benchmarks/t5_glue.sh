#!/usr/bin/env bash
# LST on T5-base over GLUE with the paper's settings (Sung, Cho, Bansal 2022, Table 1 / section 4):
#   AdamW, lr 3e-3, batch 100, max length 128, 500 warm-up steps then linear decay,
#   20 epochs on the small tasks (CoLA, MRPC, RTE), 10 on the large ones (SST-2, QNLI, QQP, MNLI),
#   reduction factor r = 8, side layers dropped at blocks 0, 4, 8 (lst layer indices 1, 5, 9: layer i
#   is the output of block i-1), labels cast as words and scored as candidates.
# Reference (paper, T5-base): GLUE average 84.1 at 5.5 GB training memory for LST.
#
# Needs: a CUDA GPU, the model hub (google-t5/t5-base, its tokenizer.json), `make setup` with a CUDA
# torch (make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"), and the
# GLUE TSVs as distributed by GLUE (one folder per task: train.tsv, dev.tsv; MNLI: dev_matched.tsv).
# It cannot run on the CPU-only, offline machines lst is developed on; nothing here has been run.
#
#   GLUE_DIR=/data/glue OUT=t5-glue bash benchmarks/t5_glue.sh            # every task below
#   GLUE_DIR=/data/glue TASKS="RTE MRPC" bash benchmarks/t5_glue.sh        # a subset
# Overrides for a smoke test of the plumbing: MODEL (a local T5 dir), DEVICE=cpu, KEPT, EPOCHS, INIT.
#
# Per task: one `lst extract` (encoder states over the input, decoder states teacher-forced on the
# gold label word for train and on every label word for dev; bf16, since T5 overflows fp16), then one
# training run from the store. Only the layers training reads are stored (embedding + the 9 kept
# blocks, in both stacks): 10 layers x 768 x 2 bytes, about 15 kB per token. Estimated from typical
# GLUE lengths: ~13 GB for SST-2, ~80 / ~165 / ~240 GB for QNLI / QQP / MNLI (check with
# `lst extract ... --dry-run` first); those three are read from disk per batch, not loaded into RAM.
# Side blocks start from the backbone's blocks pruned to 1/r by Fisher information, as in the paper
# (INIT=random for a random start); the Fisher scores are cached beside each store.
# Results: $OUT/runs/<task>/metrics.json; a summary in $OUT/summary.tsv.
# Differences from the paper: the backbone runs without dropout (a cache is deterministic), inputs
# carry no T5 task prefix ("sst2 sentence: ..."), and STS-B (regression as text) is not supported yet.
set -euo pipefail

GLUE_DIR=${GLUE_DIR:?set GLUE_DIR to a folder with CoLA/ MRPC/ RTE/ SST-2/ QNLI/ QQP/ MNLI/}
OUT=${OUT:-t5-glue}
MODEL=${MODEL:-google-t5/t5-base}
TASKS=${TASKS:-"CoLA MRPC RTE SST-2 QNLI QQP MNLI"}
LST=${LST:-.venv/bin/lst}
PYTHON=${PYTHON:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
INIT=${INIT:-pruned}
KEPT=${KEPT:-2,3,4,6,7,8,10,11,12}   # 9 of 12 blocks: all but blocks 0, 4, 8
mkdir -p "$OUT/stores" "$OUT/runs"

for task in $TASKS; do
  extra=() eval_split=dev epochs=20 preload=1
  case $task in
    CoLA)  extra=(--no-header --text-column 3 --label-column 1) ;;  # CoLA's TSVs have no header
    QQP)   extra=(--label-column is_duplicate); epochs=10 preload=0 ;;
    MNLI)  extra=(--label-column gold_label); eval_split=dev_matched; epochs=10 preload=0 ;;
    QNLI)  extra=(--text-column question); epochs=10 preload=0 ;;  # pair: question + sentence
    SST-2) epochs=10 ;;
  esac
  store="$OUT/stores/$task.zarr"
  "$LST" extract "$MODEL" "$GLUE_DIR/$task" --out "$store" --split train --split "$eval_split" \
    --layers "0,$KEPT" --max-length 128 --store-dtype bf16 --precision fp32 --batch-size 128 --quoting none \
    --device "$DEVICE" ${EXTRACT_ARGS:-} "${extra[@]}"
  "$PYTHON" - "$store" "$OUT/runs/$task" "${EPOCHS:-$epochs}" "$eval_split" "$KEPT" "$DEVICE" "$preload" "$INIT" <<'EOF'
import sys
from sidetrain import TrainConfig, train
store, out, epochs, eval_split, kept, device, preload, init = sys.argv[1:]
summary = train(TrainConfig(store=store, out=out, epochs=int(epochs), eval_split=eval_split, lr=3e-3,
                            batch_size=100, warmup_steps=500, reduction_factor=8,
                            layers=[int(x) for x in kept.split(",")], device=device, preload=preload == "1",
                            extra={"init": init}))
scores = summary["splits"][eval_split]
print(f"{out}\t{scores}\tpeak {summary['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
EOF
done

"$PYTHON" - "$OUT" $TASKS <<'EOF'
import json, sys
from pathlib import Path
out, tasks = Path(sys.argv[1]), sys.argv[2:]
# GLUE's reported metric per task (the paper averages these).
main = {"CoLA": "matthews", "MRPC": "f1", "QQP": "f1"}
rows = ["task\tmetric\tdev\tpeak_GiB"]
for t in tasks:
    m = json.loads((out / "runs" / t / "metrics.json").read_text())
    split = m["eval_split"]
    name = main.get(t, "accuracy")
    rows.append(f"{t}\t{name}\t{m['splits'][split][name]:.4f}\t{m['peak_memory_bytes'] / 2**30:.2f}")
(out / "summary.tsv").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
