"""OpenAI CLIP's byte-level BPE tokenizer.

Vocabulary: ``bpe_simple_vocab_16e6.txt.gz`` beside this file, MIT-licensed data from OpenAI CLIP,
taken unchanged from the open_clip_torch 3.3.0 wheel (``open_clip/bpe_simple_vocab_16e6.txt.gz``).
SHA-256: 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a (see VOCAB.md).
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import ftfy
import regex
import torch

DEFAULT_VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
NUM_MERGES = 49152 - 256 - 2  # 48894 merge lines follow the header line
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
START_ID = VOCAB_SIZE - 2  # 49406
END_ID = VOCAB_SIZE - 1  # 49407
CONTEXT_LENGTH = 77

# Special tokens, then OpenAI CLIP's pieces: contractions, letter runs, single digits, other non-space runs.
_PIECE_PATTERN = regex.compile(
    regex.escape(START_TOKEN) + "|" + regex.escape(END_TOKEN)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, so that BPE never sees whitespace or
    control characters. Printable Latin-1 bytes map to themselves; the other 68 bytes map to
    chr(256), chr(257), ... in byte order. The dict's order (printable bytes first) is the order
    of the first 256 vocabulary entries."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def clean_text(text: str) -> str:
    """ftfy repair, HTML unescaped twice, whitespace runs collapsed to one space, lower-cased."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def _read_merges(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"BPE vocabulary file {path} not found; restore it from the repository "
            "(models/bpe_simple_vocab_16e6.txt.gz)."
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(
            f"BPE vocabulary file {path} is not a readable gzip text file ({e}); "
            "restore it from the repository."
        ) from None
    pairs = [line.split() for line in lines[1 : NUM_MERGES + 1]]
    if len(pairs) != NUM_MERGES or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"BPE vocabulary file {path} does not hold {NUM_MERGES} merge lines of two symbols each; "
            "restore it from the repository."
        )
    return [(first, second) for first, second in pairs]


class SimpleTokenizer:
    """Text <-> CLIP token ids (49408 ids; start 49406, end 49407)."""

    def __init__(self, vocab_path: str | Path = DEFAULT_VOCAB_PATH) -> None:
        self.vocab_path = Path(vocab_path)
        merges = _read_merges(self.vocab_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}

        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols]  # bytes inside and at the end of a word
        vocab += ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        if len(self.encoder) != VOCAB_SIZE:
            raise ValueError(
                f"BPE vocabulary file {self.vocab_path} gives {len(self.encoder)} distinct tokens, "
                f"not {VOCAB_SIZE}; restore it from the repository."
            )
        self.decoder: dict[int, str] = {i: s for s, i in self.encoder.items()}
        self.merge_ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self.start_id = self.encoder[START_TOKEN]
        self.end_id = self.encoder[END_TOKEN]
        # piece -> space-separated BPE symbols; special tokens are never split
        self.cache: dict[str, str] = {START_TOKEN: START_TOKEN, END_TOKEN: END_TOKEN}

    def bpe(self, piece: str) -> str:
        """Merge one byte-encoded piece into BPE symbols, returned space-separated; the last
        symbol carries the end-of-word mark '</w>'."""
        cached = self.cache.get(piece)
        if cached is not None:
            return cached
        word = list(piece[:-1]) + [piece[-1] + "</w>"]
        while len(word) > 1:
            # the adjacent pair with the lowest merge rank is merged everywhere, left to right
            first, second = min(zip(word, word[1:]), key=lambda pair: self.merge_ranks.get(pair, NUM_MERGES))
            if (first, second) not in self.merge_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = " ".join(word)
        self.cache[piece] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without start and end tokens."""
        ids: list[int] = []
        for piece in _PIECE_PATTERN.findall(clean_text(text)):
            encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(encoded).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; each end-of-word mark becomes a space."""
        symbols = "".join(self.decoder[int(i)] for i in ids)
        data = bytes(self.byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    """The tokenizer on the bundled vocabulary, loaded on first use."""
    return SimpleTokenizer()


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tokenize(
    texts: str | list[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
) -> torch.LongTensor:
    """[start] + ids + [end], zero padded -> LongTensor [n, context_length]."""
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = default_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tokenizer.start_id] + tokenizer.encode(text) + [tokenizer.end_id]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"Text {_shorten(text)!r} is {len(ids)} tokens long with start and end tokens, "
                    f"more than the context length {context_length}; pass truncate=True to cut it."
                )
            ids = ids[:context_length]
            ids[-1] = tokenizer.end_id
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result  # [n, context_length]
