"""What the text encoders will make of the prompts, said before any weight loads: words past the 75 tokens a plain
prompt keeps, A1111 weighting syntax in a prompt read as plain text, and weights that overflow."""
from __future__ import annotations

import math
from typing import Any, Sequence

from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
from ldm.modules.encoders.prompt_weighting import has_weighting_syntax, parse_prompt_attention
from ldm.pipeline.errors import UsageError
from ldm.pipeline.extra_networks import other_networks, strip_extra_networks
from ldm.pipeline.request import Request

CHUNK_TOKENS = 75  # A1111 reads a weighted prompt in chunks of 75 tokens
MAX_CHUNKS = 64  # 4,800 tokens: far past any prompt made by hand


def prompt_notes(requests: Sequence[Request], tokenizer: Any = None) -> list[str]:
    """The notes for `requests` (truncation for plainly read prompts, then weighting syntax read as text);
    UsageError for a weighted prompt whose weights overflow. `tokenizer` knows the pipeline's embeddings."""
    texts = {id(request): [strip_extra_networks(prompt) for prompt in request.prompts] + list(request.negative_prompts)
             for request in requests}
    weighted = [text for request in requests if request.prompt_weighting for text in texts[id(request)]]
    plain = [text for request in requests if not request.prompt_weighting for text in texts[id(request)]]
    try:
        weighting_notes(weighted, True)
    except ValueError as error:
        raise UsageError(str(error)) from None
    check_chunk_count(weighted, tokenizer)
    ignored = other_networks([prompt for request in requests for prompt in request.prompts])
    skipped = [f"{', '.join(ignored)}: taken out of the prompt but not applied (this tool loads LoRAs only)"]
    return truncation_notes(plain, tokenizer=tokenizer) + weighting_notes(plain, False) + (skipped if ignored else [])


def check_chunk_count(prompts: list[str], tokenizer: Any = None) -> None:
    """UsageError for a weighted prompt of more than MAX_CHUNKS chunks of 75 tokens: each chunk is encoded and
    attended to at every step, so a pasted book would fill memory long after the check."""
    tokenizer = tokenizer or CLIPTokenizer()
    for prompt in dict.fromkeys(prompts):
        tokens = len(tokenizer.encode(prompt))
        if tokens > MAX_CHUNKS * CHUNK_TOKENS:
            raise UsageError(f"prompt \"{shorten(prompt)}\" has {tokens} tokens, more than the {MAX_CHUNKS} chunks "
                             f"of {CHUNK_TOKENS} that weighted prompts are read in: shorten it")


def shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def truncation_notes(prompts: list[str], context_length: int = 77, tokenizer: Any = None) -> list[str]:
    """One line per distinct prompt longer than the text encoder reads (context_length - 2 tokens: start and end
    take two), naming the words it drops, as the model would otherwise ignore them silently. `tokenizer`: one that
    knows the run's embeddings (default: plain CLIP)."""
    tokenizer, room, notes = tokenizer or CLIPTokenizer(), context_length - 2, []
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer.encode(prompt)
        if len(ids) > room:
            notes.append(f"prompt \"{shorten(prompt)}\" has {len(ids)} tokens but the text encoder reads {room}: "
                         f"\"{shorten(tokenizer.decode(ids[room:]))}\" is ignored")
    return notes


def weighting_notes(prompts: list[str], weighting: bool) -> list[str]:
    """With --prompt_weighting, none, after checking that every prompt can be read with weights (ValueError naming
    the first that cannot); without, one note for the run if a prompt uses A1111's weighting syntax."""
    if weighting:
        for prompt in dict.fromkeys(prompts):
            for text, weight in parse_prompt_attention(prompt):
                if weight is not None and not math.isfinite(weight):  # a weight like (word:1e400), or nested ones
                    raise ValueError(f"the weight of \"{shorten(text)}\" in prompt \"{shorten(prompt)}\" "
                                     f"overflows to {weight}: use weights such as (word:1.2)")
        return []
    marked = next((prompt for prompt in dict.fromkeys(prompts) if has_weighting_syntax(prompt)), None)
    if marked is None:
        return []
    return [f"prompt \"{shorten(marked)}\" uses A1111 weighting syntax ((word), [word], (word:1.2), BREAK), which "
            f"is read as plain text: pass --prompt_weighting to read it as weights"]
