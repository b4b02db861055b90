"""CLIP's byte-level BPE tokenizer, as OpenAI CLIP, HF `CLIPTokenizer` (slow) and open_clip tokenize prompts.

The vocabulary `bpe_simple_vocab_16e6.txt.gz` is OpenAI's (MIT, see LICENSE-CLIP-VOCAB.txt). Ids: the 256 byte
characters, the same with the end-of-word marker "</w>", the 48,894 merges in rank order, then start (49406) and end
(49407) of text: 49,408 in all.
"""
from __future__ import annotations

import functools
import gzip
import heapq
import html
import json
from pathlib import Path
from typing import Sequence

import ftfy
import regex
import torch

VOCABULARY_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407
CONTEXT_LENGTH = 77
END_OF_WORD = "</w>"
# A word longer than this (in UTF-8 bytes) is read in pieces of this length, each merged on its own: merging is
# O(n log n) in a word's length, and no real word comes near it (CLIP's longest token is 32 bytes, and 75 tokens fill
# a prompt). Under it, ids are those of the reference tokenizers whatever the word.
MAX_WORD_BYTES = 4096
# Words this long and shorter are remembered (prompts repeat words); longer ones would only fill memory.
MAX_CACHED_WORD = 256

# How the start / end tokens are spelt when a prompt contains them literally: OpenAI CLIP and HF (SD 1.x) vs open_clip
# (SD 2.x). Either way they get ids 49406 / 49407.
OPENAI_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
OPEN_CLIP_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")

# Words are runs of letters, single digits, or runs of other non-space characters; English contractions split off.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen) are shifted to 256 and up,
    so that no BPE symbol is whitespace or a control character. Dict order is the vocabulary's id order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in mapping)
    for offset, byte in enumerate(shifted):
        mapping[byte] = chr(256 + offset)
    return mapping


def write_hf_vocabulary(folder: Path) -> None:
    """vocab.json / merges.txt in the Hugging Face CLIP tokenizer layout, derived from this package's vocabulary (for
    tools that want those files; nothing is downloaded)."""
    merges = gzip.open(VOCABULARY_PATH, "rt", encoding="utf-8").read().split("\n")[1:NUM_MERGES + 1]
    characters = list(byte_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocabulary = {token: index for index, token in enumerate(tokens)}
    (Path(folder) / "vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=None)
def load_vocabulary(path: Path = VOCABULARY_PATH) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(symbol -> id without the two special tokens, merge pair -> rank), read once per process."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"CLIP vocabulary {path} is missing; reinstall the package, which ships it") from error
    # line 0 is a version header; the merges the released models were trained with are the next NUM_MERGES lines
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{path} does not hold {NUM_MERGES} BPE merges; it is not CLIP's bpe_simple_vocab_16e6")
    byte_symbols = list(byte_to_unicode().values())
    symbols = [*byte_symbols, *(symbol + END_OF_WORD for symbol in byte_symbols), *(a + b for a, b in merges)]
    ids = {symbol: index for index, symbol in enumerate(symbols)}
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    return ids, ranks


@functools.lru_cache(maxsize=None)
def merge_table() -> tuple[list[int], dict[int, int], list[int]]:
    """The vocabulary as `bpe_ids` reads it: (id of each byte value 0-255, (left id << 16 | right id) -> merge rank,
    id of each merge's result by rank). Ids are below 2**16."""
    ids, ranks = load_vocabulary()
    mapping = byte_to_unicode()
    byte_ids = [ids[mapping[byte]] for byte in range(256)]
    merges = {ids[left] << 16 | ids[right]: rank for (left, right), rank in ranks.items()}
    merged_ids = [ids[left + right] for left, right in sorted(ranks, key=ranks.__getitem__)]
    # what makes heap order equal to the reference's pass order: every merge's parts exist before it
    made_at = {ids[left + right]: rank for (left, right), rank in ranks.items()}
    if any(made_at.get(ids[part], -1) >= rank for (left, right), rank in ranks.items() for part in (left, right)):
        raise ValueError("the BPE merges use a symbol before the merge that makes it; not CLIP's vocabulary")
    return byte_ids, merges, merged_ids


def bpe_ids(data: bytes, end_of_word: bool = True) -> list[int]:
    """Token ids of one word's UTF-8 bytes: merge the best-ranked adjacent pair, leftmost first, until none is.
    `end_of_word`: the last byte ends the word (False for a piece of an overlong word).

    This is CLIP's BPE: the reference implementations merge every occurrence of the best pair in one pass, left to
    right, which gives the same result because a merge never makes a pair ranked before its own (each merge's parts
    are made by earlier merges). A heap of candidate pairs over a linked list of symbols makes it O(n log n) rather
    than O(n^2), as the Hugging Face tokenizers library does.
    """
    byte_ids, merges, merged_ids = merge_table()
    symbols = [byte_ids[byte] for byte in data]  # -1 once merged into the symbol on its left
    if end_of_word:
        symbols[-1] += len(byte_ids)  # the last byte carries the end-of-word marker: "x</w>" is id("x") + 256
    count = len(symbols)
    following = list(range(1, count + 1))  # index of the next live symbol; `count` past the end
    preceding = list(range(-1, count - 1))
    queue = [(rank, left) for left in range(count - 1)
             if (rank := merges.get(symbols[left] << 16 | symbols[left + 1])) is not None]
    heapq.heapify(queue)
    while queue:
        rank, left = heapq.heappop(queue)
        right = following[left]
        # stale when either symbol has changed since the pair was queued
        if right >= count or symbols[left] < 0 or merges.get(symbols[left] << 16 | symbols[right]) != rank:
            continue
        merged = symbols[left] = merged_ids[rank]
        symbols[right] = -1
        after = following[left] = following[right]
        if after < count:
            preceding[after] = left
            if (pair_rank := merges.get(merged << 16 | symbols[after])) is not None:
                heapq.heappush(queue, (pair_rank, left))
        before = preceding[left]
        if before >= 0 and (pair_rank := merges.get(symbols[before] << 16 | merged)) is not None:
            heapq.heappush(queue, (pair_rank, before))
    return [symbol for symbol in symbols if symbol >= 0]


def bpe_symbols(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split one byte-mapped word into BPE symbols as the reference implementations do (every occurrence of the
    best-ranked pair merged per pass; O(n^2) in the word's length): the plain statement of what `bpe_ids` computes."""
    symbols = [*word[:-1], word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        ranked = [(ranks[pair], pair) for pair in zip(symbols, symbols[1:]) if pair in ranks]
        if not ranked:
            break
        _, (first, second) = min(ranked)
        merged = []
        index = 0
        while index < len(symbols):
            # left to right, so in a run like "a a a" the first two merge and the third stays
            if index + 1 < len(symbols) and symbols[index] == first and symbols[index + 1] == second:
                merged.append(first + second)
                index += 2
            else:
                merged.append(symbols[index])
                index += 1
        symbols = merged
    return symbols


def clean_text(text: str, unescape_html: bool) -> str:
    """ftfy's repairs (mojibake, full-width forms, curly quotes; HTML entities unless the text has '<' or '>'),
    optionally HTML entities again, twice, for doubly escaped ones; then whitespace collapsed, lower case."""
    text = ftfy.fix_text(text)
    if unescape_html:
        text = html.unescape(html.unescape(text))
    return regex.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """Prompt -> CLIP token ids.

    `unescape_html`: open_clip (SD 2.x) decodes HTML entities such as "&amp;" itself; HF's slow `CLIPTokenizer`,
    which CompVis SD 1.x uses, leaves them to ftfy, which keeps them in text that has '<' or '>'.
    `special_tokens`: how a literal start / end token is spelt in a prompt.
    `pad_token_id`: HF pads with the end token (SD 1.x), open_clip with 0 (SD 2.x).
    """

    def __init__(self, unescape_html: bool = False, special_tokens: tuple[str, str] = OPENAI_SPECIAL_TOKENS,
                 pad_token_id: int = END_OF_TEXT_ID):
        if len(special_tokens) != 2:
            raise ValueError(f"special_tokens must be (start, end) spellings, got {special_tokens!r}")
        self.unescape_html = unescape_html
        self.special_tokens = dict(zip(special_tokens, (START_OF_TEXT_ID, END_OF_TEXT_ID)))
        self.pad_token_id = pad_token_id
        specials = "|".join(regex.escape(token) for token in special_tokens)
        self.pattern = regex.compile(f"{specials}|{WORD_PATTERN}", regex.IGNORECASE)
        self.byte_map = byte_to_unicode()
        self.cache: dict[str, list[int]] = {}
        self.placeholders: dict[str, list[int]] = {}  # cleaned word -> the ids it stands for (textual inversion)
        self.placeholder_pattern: regex.Pattern | None = None

    @classmethod
    def for_open_clip(cls) -> "CLIPTokenizer":
        """The tokenizer of open_clip's `tokenize`, used by SD 2.x and SDXL's OpenCLIP encoder."""
        return cls(unescape_html=True, special_tokens=OPEN_CLIP_SPECIAL_TOKENS, pad_token_id=0)

    def word_ids(self, word: str) -> list[int]:
        """Ids of one word of the split prompt, cached since prompts repeat words. A word longer than
        `MAX_WORD_BYTES` is read in pieces of that length, only the last of which ends the word."""
        if word in self.special_tokens:
            return [self.special_tokens[word]]
        cached = self.cache.get(word)
        if cached is None:
            data = word.encode("utf-8")
            pieces = [data[start:start + MAX_WORD_BYTES] for start in range(0, len(data), MAX_WORD_BYTES)]
            known: dict[bytes, list[int]] = {}  # a long word is often one piece repeated
            cached = []
            for piece in pieces[:-1]:
                if piece not in known:
                    known[piece] = bpe_ids(piece, end_of_word=False)
                cached += known[piece]
            cached += bpe_ids(pieces[-1])
            if len(word) <= MAX_CACHED_WORD:
                self.cache[word] = cached
        return cached

    def add_placeholder(self, word: str, ids: Sequence[int]) -> None:
        """Tokenize each whole-word occurrence of `word` (any case) in a prompt as `ids`, not as its BPE tokens.

        A whole word is not joined to a letter, digit, "_" or "-" on either side. Adding a word again replaces its ids.
        """
        cleaned = clean_text(word, self.unescape_html)
        if not cleaned or not ids:
            raise ValueError(f"a placeholder needs a word and at least one id, got {word!r} -> {list(ids)}")
        self.placeholders[cleaned] = [int(index) for index in ids]
        # longest first, so that of two words where one starts the other the longer one wins
        words = "|".join(regex.escape(name) for name in sorted(self.placeholders, key=len, reverse=True))
        self.placeholder_pattern = regex.compile(rf"(?<![\w-])(?:{words})(?![\w-])")

    def placeholders_in(self, text: str) -> list[str]:
        """The placeholder words `text` uses, in order of first use."""
        if self.placeholder_pattern is None:
            return []
        return list(dict.fromkeys(self.placeholder_pattern.findall(clean_text(text, self.unescape_html))))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without start / end tokens, untruncated."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
        cleaned = clean_text(text, self.unescape_html)
        if self.placeholder_pattern is None:
            return self.encode_cleaned(cleaned)
        ids, start = [], 0
        for match in self.placeholder_pattern.finditer(cleaned):
            ids += self.encode_cleaned(cleaned[start:match.start()]) + self.placeholders[match.group()]
            start = match.end()
        return ids + self.encode_cleaned(cleaned[start:])

    def encode_cleaned(self, cleaned: str) -> list[int]:
        return [token for word in self.pattern.findall(cleaned) for token in self.word_ids(word)]

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
                 pad_token_id: int | None = None) -> torch.LongTensor:
        """[B, context_length] ids: start, the prompt truncated to context_length - 2 tokens, end, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must leave room for the start and end tokens, got {context_length}")
        pad = self.pad_token_id if pad_token_id is None else pad_token_id
        batch = torch.full((len(texts), context_length), pad, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [START_OF_TEXT_ID, *self.encode(text)[:context_length - 2], END_OF_TEXT_ID]
            batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return batch

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (cleaned and lower-cased, as the model saw it), for inspecting prompts."""
        vocabulary, _ = load_vocabulary()
        symbols = [*vocabulary, *self.special_tokens]  # dict order is id order; the specials are 49406, 49407
        # a placeholder's ids (a run of them, or any part of one) read as its word, spelt as symbols are
        words = {index: "".join(self.byte_map[byte] for byte in word.encode("utf-8")) + END_OF_WORD
                 for word, word_ids in self.placeholders.items() for index in word_ids}
        following = {later: earlier for word_ids in self.placeholders.values()
                     for earlier, later in zip(word_ids, word_ids[1:])}
        ids = [int(index) for index in ids]
        if any(not 0 <= index < len(symbols) and index not in words for index in ids):
            raise ValueError(f"token ids {ids} fall outside CLIP's vocabulary of {len(symbols)}")
        pieces = [("" if position and following.get(index) == ids[position - 1] else words[index]) if index in words
                  else symbols[index] for position, index in enumerate(ids)]
        text = "".join(pieces).replace(END_OF_WORD, " ")
        unicode_to_byte = {char: byte for byte, char in self.byte_map.items()}
        # a plain space here can only come from an end-of-word marker: real spaces are mapped to another character
        raw = bytes(ord(" ") if char == " " else unicode_to_byte[char] for char in text)
        return raw.decode("utf-8", errors="replace").strip()
