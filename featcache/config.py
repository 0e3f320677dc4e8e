"""Options of `lst extract`: one dataclass, whose fields carry the defaults and the help the CLI shows."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any

from . import store as S
from .errors import DatasetError, StoreError, expected


def opt(default: Any = MISSING, help: str = "", *, library_only: str = "") -> Any:
    """A config field with its help text: the one place the option's default and `lst --help` text live.

    `library_only` (the reason) marks a field that deliberately has no command-line flag; cli.py gives every
    other field one, and tests/test_options.py fails for a field that has neither.
    """
    metadata = {"help": help, "library_only": library_only}
    return field(metadata=metadata) if default is MISSING else field(default=default, metadata=metadata)


@dataclass
class ExtractConfig:
    """Options of `lst extract`; the resolved copy is saved in the manifest."""

    model: str = opt(help="Backbone: a local model directory or a hub id.")
    dataset: str = opt(help="A csv/tsv/json/jsonl/parquet file, a folder of one file per split (train.tsv, "
                            "dev.tsv, ...), or a datasets.save_to_disk folder.")
    out: str = opt(help="Where to write the Zarr store: a local path or an fsspec URL (s3://, gs://, memory://).")
    splits: list[str] | None = opt(  # noqa: RUF009 (opt() is a field)
        None, "Split to extract (repeatable). Default: all.")
    text_column: str | None = opt(None, "Text column. Default: text, sentence, sentence1, ...")
    text_pair_column: str | None = opt(None, "Second text of a pair (default: inferred).")
    label_column: str | None = opt(None, "Label column. Default: label, score, ...")
    task: str = opt("auto", "auto, classification, regression, or generate (decoder-only backbones: the label "
                            "column holds each row's target text, trained through the frozen LM head).")
    max_length: int = opt(128, "Tokens per example; longer texts are truncated and counted.")
    layers: list[int] | None = opt(  # noqa: RUF009 (opt() is a field)
        None, "hidden_states indices to store: 'all', '0,3,6', '0-4' (0 = embedding output).")
    store_dtype: str = opt("fp16", "Storage dtype of the activations: fp32 (exact), fp16, bf16, or int8 (one "
                                   "absmax scale per token and layer, ~1/4 of fp32). The measured error of each "
                                   "is in the manifest.")
    precision: str = opt("fp32", "Compute precision of the backbone. int8: torch dynamic quantisation on CPU, "
                                 "bitsandbytes on CUDA. Its measured drift against fp32 is recorded in the "
                                 "manifest.")
    batch_size: int = opt(64, "Examples per backbone forward.")
    device: str = opt("auto", "auto, cpu or cuda.")
    overwrite: bool = opt(False, "Replace an existing store at --out.")
    quoting: str = opt("auto", "Quote handling of csv/tsv files (auto picks per file).")
    header: bool = opt(True, "Delimited files start with a header row.")
    shard_tokens: int = opt(0, "Tokens per shard, the unit of writing and resuming (0: about 64 MiB per shard).")
    chunk_tokens: int = opt(64, "Tokens per inner chunk of a shard, the unit of a random read.")
    dry_run: bool = opt(False, "Print the pre-flight summary (examples, tokens, truncated, layers, bytes/token, "
                               "store size, shards) and exit without loading the backbone.")
    error_sample: int = opt(32, "Examples on which storage error and precision drift are measured (0: skip).")
    image_column: str | None = opt(None, "Image stores: the column of a csv/tsv/jsonl/parquet split holding image "
                                         "paths (relative to the file) or a datasets Image feature (default: "
                                         "image, image_path, path, file, ...).")
    image_model: str | None = opt(None, "Vision-language store: the image model beside the text backbone MODEL "
                                        "(efficientnet-lite0, bundled; efficientnet-lite1..4; or a transformers "
                                        "vision model folder). Each distinct image of --image-column is stored "
                                        "once, each row's text (question) as MODEL's text store.")
    components: int | None = opt(None, "Compress: keep each stored layer as K coefficients on a PCA basis of that layer "
                                       "(fitted on a sample of the training split's tokens; stored with its mean and "
                                       "explained variance). Readers and `lst train` rebuild h ~= c U^T + mu; "
                                       "--store-dtype applies to the coefficients. Default: the full states. "
                                       "docs/compress.md says how to pick K (d/4: 4x smaller at fp16).")
    components_sample: int = opt(16384, "Compressed stores: training-split tokens the PCA basis is fitted on "
                                        "(seeded rows; at least --components).")
    components_seed: int = opt(0, "Compressed stores: seed of the rows the basis is fitted on (a refit after a "
                                  "kill is identical).")
    label_text: str | None = opt(None, "Encoder-decoder (T5) and decoder-only stores: JSON file mapping each label "
                                       "to its target text (T5's default: its GLUE words, else the label names; a "
                                       "decoder store scores labels through its LM head only with it).")

    def __post_init__(self) -> None:
        if self.store_dtype not in S.STORE_DTYPES:
            raise StoreError(expected(f"--store-dtype one of {S.STORE_DTYPES}", self.store_dtype))
        if self.max_length < 2:
            raise DatasetError(expected("--max-length of at least 2", self.max_length))
        if self.batch_size < 1:
            raise DatasetError(expected("--batch-size of at least 1", self.batch_size))
        if self.task not in ("auto", "classification", "regression", "generate"):
            raise DatasetError(expected("--task auto, classification, regression or generate", self.task))
        if self.components is not None and self.components < 1:
            raise StoreError(expected("--components of at least 1 (PCA coefficients per layer)", self.components))
        if self.components is not None and self.components_sample < self.components:
            raise StoreError(expected(f"--components-sample of at least --components ({self.components}) tokens",
                                      self.components_sample, "A basis of K components needs at least K tokens."))
        if self.shard_tokens < 0 or self.chunk_tokens < 1:
            raise StoreError(expected("--shard-tokens >= 0 and --chunk-tokens >= 1",
                                      (self.shard_tokens, self.chunk_tokens)))
