"""What the text encoders will make of the prompts, said before any weight loads: words past the 75 tokens a plain
prompt keeps, A1111 weighting syntax in a prompt read as plain text, and weights that overflow."""
from __future__ import annotations

import math
from typing import Any, Sequence

from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
from ldm.modules.encoders.prompt_weighting import has_weighting_syntax, parse_prompt_attention
from ldm.pipeline.errors import UsageError
from ldm.pipeline.request import Request


def prompt_notes(requests: Sequence[Request], tokenizer: Any = None) -> list[str]:
    """The notes for `requests` (truncation for plainly read prompts, then weighting syntax read as text);
    UsageError for a weighted prompt whose weights overflow. `tokenizer` knows the pipeline's embeddings."""
    weighted = [text for request in requests if request.prompt_weighting
                for text in (*request.prompts, *request.negative_prompts)]
    plain = [text for request in requests if not request.prompt_weighting
             for text in (*request.prompts, *request.negative_prompts)]
    try:
        weighting_notes(weighted, True)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return truncation_notes(plain, tokenizer=tokenizer) + weighting_notes(plain, False)


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
