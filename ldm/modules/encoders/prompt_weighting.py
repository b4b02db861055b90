"""AUTOMATIC1111's prompt reading (opt-in): attention weights, `BREAK`, and prompts longer than the text encoder.

Syntax (A1111's `parse_prompt_attention`): `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by
1.1, `(text:1.5)` multiplies it by 1.5; nesting multiplies; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the characters
themselves; a bracket never closed applies to the rest of the prompt, a closing bracket never opened is text;
spaces may stand around an explicit weight (`(text: 1.5 )`); `BREAK` (a word in capitals) outside brackets starts a
new chunk (inside brackets it is the word BREAK, with the brackets' weight negated, as A1111 reads it).

Encoding (A1111's `FrozenCLIPEmbedderWithCustomWords`): the tokens are cut into chunks of 75 (a chunk that fills up
gives the words after its last comma, if that comma is at most 20 tokens back, to the next chunk), each chunk is
encoded on its own with start, end and padding to 77, and the states are concatenated along the sequence:
[B, 77 * chunks, D]. Each token's state is multiplied by its weight, and the chunk is then rescaled so that its mean
is what it was ("Original" emphasis). Prompts of one call are padded with empty chunks to the same count, since
classifier-free guidance batches prompts with negative prompts. SDXL's pooled embedding is the first chunk's,
unweighted. A prompt without weights and within 75 tokens gives exactly the plain encoding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ldm.modules.encoders.clip_tokenizer import END_OF_TEXT_ID, START_OF_TEXT_ID
from ldm.modules.encoders.modules import use_clip_skip

ROUND_BRACKET_MULTIPLIER = 1.1
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"

# One lexical unit, tried in this order: a backslash with the bracket or backslash it escapes (a lone backslash is
# dropped), an opening bracket, an explicit weight closing a round bracket (spaces allowed around the number), a
# closing bracket, a run of plain text, a colon that is not part of a weight.
_ATTENTION_UNIT = re.compile(r"\\[()\[\]\\]?|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_MARKER = -1  # the weight A1111 gives a BREAK piece; brackets around it multiply it, as any other weight

Piece = list  # [text, weight], as A1111 returns them (lists, so that they compare equal to A1111's answers)


class PromptSyntaxError(ValueError):
    """A weighted prompt that cannot be read; the message names the prompt and the bad part."""


def parse_prompt_attention(text: str) -> list[Piece]:
    """`text` as [text, weight] pieces in order, exactly as A1111's function of this name returns them.

    A `BREAK` outside brackets is the piece ["BREAK", -1]; brackets multiply its -1 like any weight (so a BREAK
    inside brackets is no break for A1111's chunking, which tests for exactly -1, but the word "BREAK" weighted).
    Adjacent pieces of equal weight are merged, BREAKs included. A weight A1111 would fail to read as a float
    raises PromptSyntaxError (a ValueError) naming it; weights too large for a float become inf, as in A1111.
    """
    pieces: list[Piece] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= multiplier

    for match in _ATTENTION_UNIT.finditer(text):
        unit, weight = match.group(0), match.group(1)
        if unit.startswith("\\"):
            pieces.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(pieces))
        elif unit == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            try:
                multiplier = float(weight)
            except ValueError:
                raise PromptSyntaxError(f"the weight in \"{unit}\" (character {match.start() + 1} of prompt "
                                        f"{text!r}) is not a number: write it as in (word:1.2), or escape literal "
                                        f"brackets as \\( \\)") from None
            multiply_from(open_round.pop(), multiplier)
        elif unit == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif unit == "]" and open_square:
            multiply_from(open_square.pop(), 1 / ROUND_BRACKET_MULTIPLIER)
        else:  # text, or a bracket or weight that closes nothing
            for index, part in enumerate(_BREAK.split(unit)):
                if index:
                    pieces.append(["BREAK", BREAK_MARKER])
                pieces.append([part, 1.0])
    for start in open_round:  # never closed: the bracket reaches to the end
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        multiply_from(start, 1 / ROUND_BRACKET_MULTIPLIER)
    merged: list[Piece] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


def is_break(piece: Sequence[Any]) -> bool:
    """Whether a parsed piece starts a new chunk: A1111 tests for the text BREAK with weight exactly -1."""
    return piece[0] == "BREAK" and piece[1] == BREAK_MARKER


def has_weighting_syntax(text: str) -> bool:
    """Whether A1111 would read `text` other than as plain text (weights, escapes or BREAK)."""
    try:
        return parse_prompt_attention(text) != [[text, 1.0]]
    except PromptSyntaxError:
        return True


@dataclass
class Chunk:
    """Up to `chunk_length` token ids of a prompt with their weights, without start, end and padding."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def split_into_chunks(pieces: Sequence[Piece], encode: Callable[[str], list[int]], chunk_length: int,
                      comma_id: int, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """The weighted tokens of `pieces` in chunks of at most `chunk_length` (at least one chunk), as A1111 cuts them."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1  # where in `chunk` the last comma is, -1 for none

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for piece in pieces:
        if is_break(piece):
            close_chunk()
            continue
        text, weight = piece
        for token in encode(text):
            if token == comma_id:
                last_comma = len(chunk.tokens)
            elif (comma_backtrack and len(chunk.tokens) == chunk_length and last_comma != -1
                  and len(chunk.tokens) - last_comma <= comma_backtrack):
                # the words after the comma move on whole rather than being cut mid-phrase
                moved = Chunk(chunk.tokens[last_comma + 1:], chunk.weights[last_comma + 1:])
                del chunk.tokens[last_comma + 1:], chunk.weights[last_comma + 1:]
                close_chunk()
                chunk = moved
            if len(chunk.tokens) == chunk_length:
                close_chunk()
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        close_chunk()
    return chunks


def is_chunked_encoder(module: nn.Module) -> bool:
    """Whether `module` is one of our CLIP text encoders, which encode token ids (`encode_tokens`)."""
    return callable(getattr(module, "encode_tokens", None)) and hasattr(module, "tokenizer")


def check_chunked_encoder(module: nn.Module) -> None:
    if not is_chunked_encoder(module):
        raise TypeError(f"prompt weighting needs one of this package's CLIP text encoders, got "
                        f"{type(module).__name__}: read this model's prompts as plain text")


def prompt_chunks(encoder: nn.Module, prompt: str) -> list[Chunk]:
    """`prompt` parsed and cut into chunks with `encoder`'s tokenizer and length."""
    tokenizer = encoder.tokenizer
    comma_id = tokenizer.encode(",")[0]
    return split_into_chunks(parse_prompt_attention(prompt), tokenizer.encode, encoder.max_length - 2, comma_id)


def chunk_rows(encoder: nn.Module, chunks: Sequence[Chunk | None], device: torch.device
               ) -> tuple[torch.LongTensor, torch.Tensor]:
    """Token ids and weights [B, max_length] of one chunk per prompt: start, tokens, end, padding (None: an empty
    chunk, the encoding of an empty prompt). Start, end and padding have weight 1."""
    length = encoder.max_length
    tokens = torch.full((len(chunks), length), encoder.tokenizer.pad_token_id, dtype=torch.long)
    weights = torch.ones(len(chunks), length)
    for row, chunk in enumerate(chunks):
        chunk = chunk or Chunk()
        ids = [START_OF_TEXT_ID, *chunk.tokens, END_OF_TEXT_ID]
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        weights[row, 1:len(ids) - 1] = torch.tensor(chunk.weights)
    return tokens.to(device), weights.to(device)


def apply_emphasis(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """States [B, T, D] times each token's weight [B, T], rescaled so each prompt's mean is what it was.

    A1111 takes the mean over the whole batch it encodes, which is one prompt at a time; per prompt here, so a
    prompt's conditioning does not depend on the others in its batch.
    """
    original_mean = states.float().mean(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    weighted = states * weights[..., None].to(states.dtype)
    weighted_mean = weighted.float().mean(dim=(1, 2), keepdim=True)
    return weighted * (original_mean / weighted_mean).to(states.dtype)


def count_chunks(encoder: nn.Module, prompts: Sequence[str]) -> int:
    """The most chunks any of `prompts` needs with `encoder`."""
    return max(len(prompt_chunks(encoder, prompt)) for prompt in prompts)


def encode_weighted(encoder: nn.Module, prompts: Sequence[str], num_chunks: int | None = None
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Prompts read as A1111 does -> [B, max_length * num_chunks, D] (default: as many chunks as the longest
    needs), and for an encoder that also returns a pooled embedding, that of the first chunk, unweighted."""
    check_chunked_encoder(encoder)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    per_prompt = [prompt_chunks(encoder, prompt) for prompt in prompts]
    needed = max(len(chunks) for chunks in per_prompt)
    num_chunks = needed if num_chunks is None else num_chunks
    if num_chunks < needed:
        raise ValueError(f"num_chunks={num_chunks} is fewer than the {needed} chunks the longest prompt needs")
    device = next(encoder.parameters()).device
    encoded, pooled = [], None
    for index in range(num_chunks):
        tokens, weights = chunk_rows(encoder, [chunks[index] if index < len(chunks) else None
                                               for chunks in per_prompt], device)
        states = encoder.encode_tokens(tokens)
        if isinstance(states, tuple):  # (states, pooled): SDXL's OpenCLIP encoder
            states, chunk_pooled = states
            pooled = chunk_pooled if pooled is None else pooled
        encoded.append(apply_emphasis(states, weights))
    hidden = torch.cat(encoded, dim=1)  # [B, max_length * num_chunks, D]
    return hidden if pooled is None else (hidden, pooled)


def text_encoders(model: nn.Module) -> list[nn.Module]:
    """The text encoders of a CompVis model (`cond_stage_model`) or of SDXL (the conditioner's text embedders)."""
    conditioner = getattr(model, "conditioner", None)
    encoders = ([embedder for embedder in conditioner.embedders if is_chunked_encoder(embedder)]
                if conditioner is not None else [model.cond_stage_model])
    if not encoders:
        raise TypeError("prompt weighting found no CLIP text encoder in this model's conditioner: read its prompts "
                        "as plain text")
    for encoder in encoders:
        check_chunked_encoder(encoder)
    return encoders


def weighted_conditioning(model: nn.Module, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
                          clip_skip: int | None = None, sdxl_clip_l_skip: bool = False, **size_kwargs: Any
                          ) -> tuple[Any, Any]:
    """(cond, uncond) of `model` for prompts and negative prompts (None: no negative half) read as A1111 does, both
    with the same number of chunks. SDXL models take `size_kwargs` as their `get_learned_conditioning` does, and
    make an empty negative prompt zeros as they do without weighting.

    `clip_skip`, `sdxl_clip_l_skip`: A1111's "Clip skip" and "Clip skip SDXL" (see `use_clip_skip`); None and
    False: the encoders as they are set (by default their configured layers, A1111's clip skip 1)."""
    if clip_skip is not None or sdxl_clip_l_skip:
        with use_clip_skip(model, 1 if clip_skip is None else clip_skip, sdxl_clip_l_skip):
            return weighted_conditioning(model, prompts, negative_prompts, **size_kwargs)
    texts = [*prompts, *(negative_prompts or [])]
    num_chunks = max(count_chunks(encoder, texts) for encoder in text_encoders(model))
    if not hasattr(model, "get_unconditional_conditioning"):
        encoder = model.cond_stage_model
        uncond = None if negative_prompts is None else encode_weighted(encoder, negative_prompts, num_chunks)
        return encode_weighted(encoder, prompts, num_chunks), uncond

    def run_embedder(embedder: nn.Module, *inputs: Any) -> Any:
        if is_chunked_encoder(embedder):
            return encode_weighted(embedder, inputs[0], num_chunks)
        return embedder(*inputs)

    cond = model.get_learned_conditioning(list(prompts), run_embedder=run_embedder, **size_kwargs)
    uncond = (None if negative_prompts is None else
              model.get_unconditional_conditioning(list(negative_prompts), run_embedder=run_embedder, **size_kwargs))
    return cond, uncond
