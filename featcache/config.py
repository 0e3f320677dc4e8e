"""Options of `lst extract`: one dataclass, whose fields carry the defaults and the help the CLI shows."""

from __future__ import annotations

from dataclasses import dataclass

from . import store as S
from .errors import DatasetError, StoreError, expected


@dataclass
class ExtractConfig:
    """Options of `lst extract`; the resolved copy is saved in the manifest."""

    model: str
    dataset: str
    out: str  # a local path or an fsspec URL (s3://, gs://, memory://)
    splits: list[str] | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    task: str = "auto"  # auto | classification | regression
    max_length: int = 128
    layers: list[int] | None = None  # hidden_states indices; 0 = embedding output; None = all
    store_dtype: str = "fp16"  # fp32 | fp16 | bf16 | int8 (per-token-per-layer absmax scale)
    precision: str = "fp32"
    batch_size: int = 64
    device: str = "auto"
    overwrite: bool = False
    quoting: str = "auto"
    header: bool = True
    shard_tokens: int = 0  # 0: about 64 MiB per shard
    chunk_tokens: int = 64  # inner chunk: the unit of a random read
    dry_run: bool = False  # pre-flight summary only; the backbone is never loaded
    error_sample: int = 32  # examples on which storage error and precision drift are measured (0: skip)
    label_text: str | None = None  # encoder-decoder: JSON file mapping label -> target text

    def __post_init__(self) -> None:
        if self.store_dtype not in S.STORE_DTYPES:
            raise StoreError(expected(f"--store-dtype one of {S.STORE_DTYPES}", self.store_dtype))
        if self.max_length < 2:
            raise DatasetError(expected("--max-length of at least 2", self.max_length))
        if self.batch_size < 1:
            raise DatasetError(expected("--batch-size of at least 1", self.batch_size))
        if self.task not in ("auto", "classification", "regression"):
            raise DatasetError(expected("--task auto, classification or regression", self.task))
        if self.shard_tokens < 0 or self.chunk_tokens < 1:
            raise StoreError(expected("--shard-tokens >= 0 and chunk tokens >= 1", (self.shard_tokens, self.chunk_tokens)))
