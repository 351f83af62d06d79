"""CLIP BPE tokenizer: golden ids, cleaning, padding, truncation, vocabulary file."""

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch

from models.tokenizer import (
    DEFAULT_VOCAB_PATH,
    END_ID,
    START_ID,
    VOCAB_SHA256,
    VOCAB_SIZE,
    SimpleTokenizer,
    default_tokenizer,
    tokenize,
)

GOLDEN_PATH = Path(__file__).parent / "data" / "tokenizer_golden.json"


def ids(text: str) -> list[int]:
    row = tokenize(text)[0].tolist()
    return row[: max(i for i, t in enumerate(row) if t != 0) + 1]


def test_vocab_file_hash():
    assert hashlib.sha256(DEFAULT_VOCAB_PATH.read_bytes()).hexdigest() == VOCAB_SHA256


def test_vocab_size_and_special_ids():
    tok = default_tokenizer()
    assert len(tok.encoder) == VOCAB_SIZE == 49408
    assert (tok.start_id, tok.end_id) == (START_ID, END_ID) == (49406, 49407)
    assert default_tokenizer() is tok


def test_photo_of_a_cat():
    row = tokenize("a photo of a cat")
    assert row.shape == (1, 77) and row.dtype == torch.long
    assert row[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert row[0, 7:].eq(0).all()


def test_golden_strings():
    golden = json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))
    cases = golden["cases"]
    assert len(cases) == 1000
    rows = tokenize([c["text"] for c in cases], context_length=golden["context_length"], truncate=True)
    for case, row in zip(cases, rows.tolist()):
        n = len(case["ids"])
        assert row[:n] == case["ids"], case["text"]
        assert not any(row[n:]), case["text"]


def test_cleaning():
    base = ids("a photo of a cat")
    assert ids("A Photo OF a CAT") == base
    assert ids("  a\tphoto \n\n of   a cat  ") == base
    assert ids("a&nbsp;photo of a cat") == base
    assert ids("Tom &amp; Jerry") == ids("tom & jerry")
    assert ids("&amp;lt;b&amp;gt;") == ids("<b>")  # unescaped twice
    assert ids("cafÃ©") == ids("café")  # mojibake repaired
    assert ids("it's") == [START_ID, 585, 568, END_ID]


def test_punctuation_and_unicode():
    assert ids("cat.") == [START_ID, 2368, 269, END_ID]
    assert ids("cat!?") != ids("cat ! ?")
    for text in ("café", "猫", "😀", "Привет"):
        tok = default_tokenizer()
        assert tok.decode(tok.encode(text)) == text.lower() + " "
    assert ids("2024") == [START_ID] + ids("2 0 2 4")[1:-1] + [END_ID]  # digits one by one


def test_padding_shape_dtype():
    out = tokenize(["a", "a photo of a cat", ""], context_length=20)
    assert out.shape == (3, 20) and out.dtype == torch.long
    assert out[2, :3].tolist() == [START_ID, END_ID, 0]
    assert tokenize([]).shape == (0, 77)


def test_too_long_raises():
    text = "cat " * 100
    with pytest.raises(ValueError, match=r"'cat cat .*\.\.\.'.*context length 77.*truncate=True"):
        tokenize(text)


def test_truncate():
    out = tokenize(["cat " * 100, "a photo of a cat"], truncate=True)
    assert out.shape == (2, 77)
    assert out[0, 0] == START_ID and out[0, -1] == END_ID and out[0].ne(0).all()
    assert out[0, 1:-1].eq(2368).all()
    assert out[1, :7].tolist() == ids("a photo of a cat")


def test_round_trip():
    tok = default_tokenizer()
    text = "a photo of a damaged metal nut with a scratch on the surface"
    assert tok.decode(tok.encode(text)).strip() == text
    assert tok.decode(tok.encode("Hello, World!")).strip() == "hello , world !"


def test_missing_vocab(tmp_path):
    path = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        SimpleTokenizer(path)


def test_corrupt_vocab(tmp_path):
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("not a gzip file")
    with pytest.raises(ValueError, match="plain.txt.gz"):
        SimpleTokenizer(not_gzip)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="short.txt.gz"):
        SimpleTokenizer(short)
