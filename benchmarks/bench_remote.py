"""An epoch from an object store vs from local disk: the same fp16 MiniLM store of a banking77
subset, local and on an S3-compatible server on loopback (moto), `lst train --no-preload` each.

From S3 the reader fetches each shard whole, once, into a local cache (`$LST_SHARD_CACHE`, verified
by its checksum) and memory-maps it; the first epoch pays the download, later epochs and runs read at
local-disk speed. Goal (issue #16): an epoch from S3 at most 1.2x an epoch from local disk.

    python benchmarks/bench_remote.py [--train 1500] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import setup_logging, timed, write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    setup_logging()
    from moto.server import ThreadedMotoServer

    work = Path(tempfile.mkdtemp(prefix="lst-remote-"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", LST_SHARD_CACHE=str(work / "cache"))
    import boto3
    import pandas as pd
    import s3fs

    from featcache import ExtractConfig, extract
    from featcache.bundled import bolt_dataset_path, minilm_path
    from sidetrain import TrainConfig, train

    boto3.client("s3").create_bucket(Bucket="lst-bench")
    data = work / "data"
    data.mkdir()
    src = bolt_dataset_path("banking")
    pd.read_csv(src / "train.tsv", sep="\t").head(args.train).to_csv(data / "train.tsv", sep="\t", index=False)
    pd.read_csv(src / "dev.tsv", sep="\t").head(300).to_csv(data / "dev.tsv", sep="\t", index=False)
    local = work / "store"
    extract(ExtractConfig(model=str(minilm_path()), dataset=str(data), out=str(local), max_length=64,
                          store_dtype="fp16", device="cpu", shard_tokens=4096))
    upload_s, _ = timed(lambda: s3fs.S3FileSystem().put(str(local), "lst-bench/store", recursive=True))
    url = "s3://lst-bench/store"

    def epochs(store: str, name: str) -> list[float]:
        summary = train(TrainConfig(store=store, out=str(work / name), epochs=args.epochs, device="cpu",
                                    preload=False, resume=False))
        return [h["seconds"] for h in summary["history"]]

    rows = {"local": epochs(str(local), "local"), "s3 (cold cache)": epochs(url, "s3"),
            "s3 (warm cache, a second run)": epochs(url, "s3b")}
    server.stop()
    base = statistics.median(rows["local"])  # a shared machine is noisy: medians, not the last epoch
    lines = ["# An epoch from S3 (moto on loopback) vs local disk", "",
             (f"MiniLM-L6 fp16 store of banking77 (first {args.train} train / 300 dev rows, max length 64, "
              f"4,096-token shards), `lst train --no-preload`, {args.epochs} epochs each, one process; "
              f"upload of the local store took {upload_s:.1f} s."), "",
             "| source | s/epoch, each epoch | median s/epoch | median / local median |", "|---|---|---|---|"]
    for name, secs in rows.items():
        med = statistics.median(secs)
        lines.append(f"| {name} | {', '.join(f'{s:.2f}' for s in secs)} | {med:.2f} | {med / base:.2f}x |")
    lines.append(f"\nFirst epoch from a cold cache: {rows['s3 (cold cache)'][0] / rows['local'][0]:.2f}x the "
                 "first local epoch (it downloads every shard once).")
    write_results("remote", {"epochs": rows, "upload_s": upload_s, "train_rows": args.train}, "\n".join(lines),
                  "python benchmarks/bench_remote.py " + " ".join(sys.argv[1:]))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
