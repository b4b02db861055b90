"""CLIP's byte-level BPE tokenizer, as OpenAI CLIP, HF `CLIPTokenizer` (slow) and open_clip tokenize prompts.

The vocabulary `bpe_simple_vocab_16e6.txt.gz` is OpenAI's (MIT, see LICENSE-CLIP-VOCAB.txt). Ids: the 256 byte
characters, the same with the end-of-word marker "</w>", the 48,894 merges in rank order, then start (49406) and end
(49407) of text: 49,408 in all.
"""
from __future__ import annotations

import functools
import gzip
import html
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


def bpe_symbols(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split one byte-mapped word into BPE symbols: merge the best-ranked adjacent pair, everywhere, until none is."""
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
        """Ids of one word of the split prompt, cached since prompts repeat words."""
        if word in self.special_tokens:
            return [self.special_tokens[word]]
        cached = self.cache.get(word)
        if cached is None:
            ids, ranks = load_vocabulary()
            byte_word = "".join(self.byte_map[byte] for byte in word.encode("utf-8"))
            cached = [ids[symbol] for symbol in bpe_symbols(byte_word, ranks)]
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
