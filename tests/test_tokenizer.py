"""CLIP tokenizer against transformers' CLIPTokenizer and against recorded ids of the tokenizers SD was released with.

transformers 5 only has the tokenizers-library ("fast") CLIP tokenizer. It normalises with NFC where the slow HF
tokenizer (which CompVis SD 1.x uses) and open_clip (SD 2.x) run ftfy.fix_text, and it never decodes HTML entities.
Prompts where that matters carry recorded ids instead, produced by transformers 4.46.3's slow `CLIPTokenizer` and by
open_clip 3.3.0's `tokenize`, both with ftfy 6.3.1; on every other prompt of this set those two agree with the fast
tokenizer (checked when the ids were recorded).
"""
from __future__ import annotations

import pytest
import torch

from ldm.modules.encoders.clip_tokenizer import (END_OF_TEXT_ID, NUM_MERGES, START_OF_TEXT_ID, CLIPTokenizer,
                                                 load_vocabulary)
from reference_text import write_hf_vocabulary

transformers = pytest.importorskip("transformers")

HTML_PROMPT = "fish &amp; chips &lt;b&gt; &quot;quoted&quot; &#39;single&#39; &#x263A; &amp;amp; doubly"
HTML_WITH_TAGS_PROMPT = "tag <b>bold</b> &amp; entity next to angle brackets"
MOJIBAKE_PROMPT = "mojibake: The Mona Lisa doesn\u00e2\u20ac\u2122t have eyebrows. caf\u00c3\u00a9"
WIDTH_PROMPT = "fullwidth \uff21\uff22\uff23\uff11\uff12\uff13 and ligature \ufb01ne and \u00bd \u00b2 \u2103"
CURLY_QUOTES_PROMPT = "\u201csmart quotes\u201d \u2018single\u2019 \u2014 em dash \u2026 ellipsis"
SPECIAL_TOKENS_PROMPT = "<|startoftext|> and <|endoftext|> typed literally, <start_of_text> <end_of_text>"

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph Of An ASTRONAUT, Riding A Horse!!!",
    "",
    "   ",
    "portrait of a cat wearing a hat, 8k, trending on artstation, highly detailed (masterpiece:1.2) [sharp]",
    "it's a dog's life, they're here, we've won, I'm sure, you'll see, he'd go",
    "IT'S LOUD -- isn't it?? ... (yes) {no} <maybe> @user #tag $100 50% a+b=c ~~",
    "numbers 1234567890 3.14159 1,000,000 2nd 21st 1990s",
    "caf\u00e9 na\u00efve fa\u00e7ade jalape\u00f1o \u00c5ngstr\u00f6m \u00d8resund cr\u00e8me br\u00fbl\u00e9e",
    "Stra\u00dfe \u0130stanbul \u0391\u0398\u0397\u039d\u0391 \u041c\u043e\u0441\u043a\u0432\u0430",
    "\u6771\u4eac\u306e\u591c\u666f \u4e2d\u6587\u63d0\u793a\u8bcd \ud55c\uad6d\uc5b4 \ud504\ub86c\ud504\ud2b8",
    "emoji \U0001f431\U0001f680 \u2728 \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1ef\U0001f1f5 \u2764\ufe0f",
    "tabs\tand\nnewlines\r\n\u00a0non-breaking\u2003em space\u3000ideographic   multiple    spaces",
    "  leading and trailing whitespace \t\n",
    HTML_PROMPT,
    HTML_WITH_TAGS_PROMPT,
    MOJIBAKE_PROMPT,
    WIDTH_PROMPT,
    "zero\u200bwidth soft\u00adhyphen combining e\u0301 vs \u00e9",
    SPECIAL_TOKENS_PROMPT,
    "don't stop-believing; hold_on-to that feeling/2024 (c) snake_case CamelCase",
    CURLY_QUOTES_PROMPT,
    " ".join(["word"] * 80),
    "an extremely long prompt, " * 20,
    "a " + "supercalifragilisticexpialidocious " * 10 + "end",
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
]

# transformers 4.46.3 slow CLIPTokenizer: ftfy decodes the entities (when no '<' or '>' is present), repairs the
# mojibake, narrows full-width forms, splits ligatures and straightens quotes; the fast tokenizer does none of it.
SLOW_HF_IDS = {
    HTML_PROMPT: [49406, 2759, 261, 8855, 283, 321, 285, 257, 27706, 257, 568, 17005, 262, 8703, 261, 1756, 4426,
                  49407],
    MOJIBAKE_PROMPT: [49406, 617, 3252, 11878, 281, 518, 19143, 7424, 2503, 713, 720, 19923, 269, 15304, 49407],
    WIDTH_PROMPT: [49406, 9407, 23571, 5334, 272, 273, 274, 537, 19915, 4490, 3797, 537, 33613, 41175, 8604, 481,
                   49407],
    CURLY_QUOTES_PROMPT: [49406, 257, 4115, 5808, 257, 568, 17005, 262, 2005, 2270, 10206, 959, 3367, 33041, 49407],
}

# open_clip 3.3.0 `tokenize`: as the slow HF tokenizer, and it also decodes entities next to angle brackets and
# spells the literal special tokens <start_of_text> / <end_of_text>.
OPEN_CLIP_IDS = {
    **SLOW_HF_IDS,
    HTML_WITH_TAGS_PROMPT: [49406, 3640, 283, 321, 285, 8911, 34308, 321, 285, 261, 28455, 1131, 531, 6946, 36183,
                            49407],
    SPECIAL_TOKENS_PROMPT: [49406, 27, 347, 993, 6659, 4160, 91, 285, 537, 27, 347, 40786, 4160, 91, 285, 40753,
                            4719, 267, 49406, 49407, 49407],
}


def padded(ids: list[int], pad: int, length: int = 77) -> list[int]:
    return ids + [pad] * (length - len(ids))


@pytest.fixture(scope="module")
def hf_fast_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip_vocab")
    write_hf_vocabulary(directory)
    return transformers.CLIPTokenizer.from_pretrained(str(directory), pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def hf_fast_batch(hf_fast_tokenizer):
    return hf_fast_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True)


def test_sd1_tokenizer_matches_hf(hf_fast_batch):
    ours = CLIPTokenizer()(PROMPTS)
    assert ours.shape == (len(PROMPTS), 77) and ours.dtype == torch.long
    for row, prompt in enumerate(PROMPTS):
        if prompt in SLOW_HF_IDS:
            assert ours[row].tolist() == padded(SLOW_HF_IDS[prompt], END_OF_TEXT_ID), prompt
            assert ours[row].tolist() != hf_fast_batch["input_ids"][row], f"fast tokenizer now agrees on {prompt!r}"
        else:
            assert ours[row].tolist() == hf_fast_batch["input_ids"][row], prompt


def test_sd2_tokenizer_matches_open_clip(hf_fast_batch):
    # padding: open_clip pads with 0. Declaring "!" (id 0) the pad token, as one would for HF, makes the fast
    # tokenizer split every "!" of a prompt out as a special token, so the reference pads by attention mask instead.
    ours = CLIPTokenizer.for_open_clip()(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        reference = [token if keep else 0 for token, keep in
                     zip(hf_fast_batch["input_ids"][row], hf_fast_batch["attention_mask"][row])]
        if prompt in OPEN_CLIP_IDS:
            assert ours[row].tolist() == padded(OPEN_CLIP_IDS[prompt], 0), prompt
            assert ours[row].tolist() != reference, f"fast tokenizer now agrees on {prompt!r}"
        else:
            assert ours[row].tolist() == reference, prompt


def test_known_ids_empty_prompt_and_truncation():
    tokenizer = CLIPTokenizer()
    # the ids of the HF documentation's example prompt
    assert tokenizer.encode("a photograph of an astronaut riding a horse") == [320, 8853, 539, 550, 18376, 6765,
                                                                               320, 4558]
    assert tokenizer([""])[0].tolist() == padded([START_OF_TEXT_ID, END_OF_TEXT_ID], END_OF_TEXT_ID)
    assert CLIPTokenizer.for_open_clip()([""])[0].tolist() == padded([START_OF_TEXT_ID, END_OF_TEXT_ID], 0)
    long_prompt = " ".join(["word"] * 80)
    assert len(tokenizer.encode(long_prompt)) == 80
    row = tokenizer([long_prompt], pad_token_id=0)[0].tolist()
    assert row == [START_OF_TEXT_ID] + tokenizer.encode(long_prompt)[:75] + [END_OF_TEXT_ID]
    assert tokenizer(["a cat"], context_length=5)[0].tolist() == [START_OF_TEXT_ID, 320, 2368, END_OF_TEXT_ID,
                                                                  END_OF_TEXT_ID]


def test_single_string_decode_and_bad_input():
    tokenizer = CLIPTokenizer()
    assert torch.equal(tokenizer("A cat!"), tokenizer(["a cat!"]))
    assert tokenizer.decode(tokenizer(["A  Cat, in Tokyo! caf\u00e9"])[0, :9].tolist()) == (
        "<|startoftext|>a cat , in tokyo ! caf\u00e9 <|endoftext|>")
    with pytest.raises(TypeError, match="a prompt must be a str"):
        tokenizer.encode(None)
    with pytest.raises(ValueError, match="context_length"):
        tokenizer(["a"], context_length=1)


def test_vocabulary_is_clip_and_loaded_once():
    ids, ranks = load_vocabulary()
    assert len(ids) == END_OF_TEXT_ID - 1 and len(ranks) == NUM_MERGES
    assert ids["a</w>"] == 320 and ids["photograph</w>"] == 8853
    assert load_vocabulary() is load_vocabulary()
