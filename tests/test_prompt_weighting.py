"""--prompt_weighting: chunks of 75 tokens with A1111's comma rule and BREAK, weights with the mean restored,
cond/uncond chunk padding, SDXL, and the CLI flag end to end (the parser's answers: test_prompt_parser_a1111.py)."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.prompt_weighting import (PromptSyntaxError, encode_weighted, has_weighting_syntax,
                                                   parse_prompt_attention, prompt_chunks, split_into_chunks,
                                                   weighted_conditioning)

TEST_CONFIGS = Path(__file__).resolve().parent / "configs"

def test_bad_weight_and_syntax_detection():
    """The parser itself is checked against A1111's answers in test_prompt_parser_a1111.py."""
    with pytest.raises(PromptSyntaxError, match=r'the weight in ":1\.2\.3\)" \(character 5 .* is not a number'):
        parse_prompt_attention("x (a:1.2.3) y")
    assert not has_weighting_syntax("a castle on a hill: at dusk")
    assert all(has_weighting_syntax(text) for text in ("(a)", "[a]", "a BREAK b", "(a:1.2.3)"))


def words(count: int) -> list[str]:
    return [f"w{index}" for index in range(count)]


def toy_chunks(text: str, **kwargs) -> list[list[str]]:
    """Chunks of a prompt of whitespace-separated words, one token each, "," the comma."""
    vocabulary = {}
    encode = lambda piece: [vocabulary.setdefault(word, len(vocabulary) + 1) for word in piece.split()]  # noqa: E731
    comma = encode(",")[0]
    chunks = split_into_chunks(parse_prompt_attention(text), encode, 75, comma, **kwargs)
    names = {index: word for word, index in vocabulary.items()}
    return [[names[token] for token in chunk.tokens] for chunk in chunks]


def test_chunks_of_75_move_words_after_a_near_comma_as_a1111_does():
    plain = toy_chunks(" ".join(words(100)))
    assert [len(chunk) for chunk in plain] == [75, 25] and plain[1][0] == "w75"
    near = words(70) + [","] + words(10)[::-1]  # the comma 5 tokens before the cut: its phrase moves on whole
    assert toy_chunks(" ".join(near)) == [near[:71], near[71:]]
    assert toy_chunks(" ".join(near), comma_backtrack=0) == [near[:75], near[75:]]
    far = words(40) + [","] + words(50)  # 35 tokens back: cut at 75
    assert toy_chunks(" ".join(far)) == [far[:75], far[75:]]
    assert toy_chunks("a b BREAK c") == [["a", "b"], ["c"]]
    assert toy_chunks("BREAK c") == [[], ["c"]]  # A1111 closes the (empty) first chunk too
    assert toy_chunks("") == [[]]
    # A1111 breaks only at a piece ["BREAK", -1]: inside brackets (weight -1.1) BREAK is a word of the chunk
    assert toy_chunks("(a BREAK b)") == [["a", "BREAK", "b"]]
    assert toy_chunks("(a BREAK b:-1)") == [["a", "BREAK", "b"]]  # weight +1: a word too
    assert toy_chunks("x (B\\REAK:-1) y") == [["x"], ["y"]]  # the merged piece is ["BREAK", -1.0]: a break


def test_break_inside_brackets_is_the_word_with_a_negated_weight(sd1_encoder):
    """A1111 encodes the word BREAK inside brackets with the brackets' weight times -1, in the same chunk."""
    chunks = prompt_chunks(sd1_encoder, "(cat BREAK dog)")
    tokenize = sd1_encoder.tokenizer.encode
    assert len(chunks) == 1 and chunks[0].tokens == tokenize("cat") + tokenize("BREAK") + tokenize("dog")
    weights = [1.1] * len(tokenize("cat")) + [-1.1] * len(tokenize("BREAK")) + [1.1] * len(tokenize("dog"))
    assert chunks[0].weights == weights
    plain = sd1_encoder(["cat BREAK dog"])
    scaled = plain.clone()
    scaled[0, 1:1 + len(weights)] *= torch.tensor(weights)[:, None]
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(encode_weighted(sd1_encoder, ["(cat BREAK dog)"]), expected, rtol=1e-6, atol=1e-6)
    assert encode_weighted(sd1_encoder, ["cat BREAK dog"]).shape == (1, 154, 32)


def randomized(encoder: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`encoder` with every weight random (open_clip's zero-initialised ones included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return encoder


@pytest.fixture(scope="module")
def sd1_encoder():
    return randomized(FrozenCLIPEmbedder(width=32, layers=2, heads=2), seed=0)


@pytest.fixture(scope="module")
def sd2_encoder():
    return randomized(FrozenOpenCLIPEmbedder(layer="penultimate", width=32, layers=3, heads=2, embed_dim=32), seed=1)


SINGLE_TOKEN_WORDS = ("a photo of the red blue green cat dog house tree river castle hill sun sky cloud night day "
                      "old new big small bright dark").split()


def long_prompt(count: int) -> str:
    return " ".join(SINGLE_TOKEN_WORDS[index % len(SINGLE_TOKEN_WORDS)] for index in range(count))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_short_unweighted_prompts_give_exactly_the_plain_encoding(family, sd1_encoder, sd2_encoder):
    encoder = sd1_encoder if family == "sd1" else sd2_encoder
    prompts = ["a castle on a hill, at dusk", "", long_prompt(75)]
    assert torch.equal(encode_weighted(encoder, prompts), encoder(prompts))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_100_token_prompt_is_two_chunks_each_its_plain_encoding(family, sd1_encoder, sd2_encoder):
    encoder = sd1_encoder if family == "sd1" else sd2_encoder
    prompt = long_prompt(100)
    assert len(encoder.tokenizer.encode(prompt)) == 100
    first, rest = " ".join(prompt.split()[:75]), " ".join(prompt.split()[75:])
    encoded = encode_weighted(encoder, [prompt])
    assert encoded.shape == (1, 154, 32)
    assert torch.equal(encoded, torch.cat([encoder([first]), encoder([rest])], dim=1))
    # a comma 6 tokens before the cut sends the 6 words after it to the second chunk
    with_comma = " ".join(prompt.split()[:69]) + ", " + " ".join(prompt.split()[69:99])
    head, tail = with_comma.split(", ")
    expected = torch.cat([encoder([head + ","]), encoder([tail])], dim=1)
    assert torch.equal(encode_weighted(encoder, [with_comma]), expected)


def test_weighted_token_is_scaled_and_the_mean_restored(sd1_encoder):
    plain = sd1_encoder(["a cat photo"])  # tokens: start, a, cat, photo, end, padding
    weighted = encode_weighted(sd1_encoder, ["a (cat:1.5) [photo]"])
    weights = torch.ones(1, 77)
    weights[0, 2], weights[0, 3] = 1.5, 1 / 1.1
    scaled = plain * weights[..., None]
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weighted.mean(), plain.mean(), rtol=1e-6, atol=1e-7)
    ratio = plain.mean() / scaled.mean()
    torch.testing.assert_close(weighted[0, 2], plain[0, 2] * 1.5 * ratio)
    torch.testing.assert_close(weighted[0, 5], plain[0, 5] * ratio)  # padding: only the rescale
    assert abs(ratio.item() - 1) > 1e-4  # the rescale did something


def test_cond_and_uncond_are_padded_to_the_same_chunks_with_empty_ones(sd1_encoder):
    model = types.SimpleNamespace(cond_stage_model=sd1_encoder)
    prompt = long_prompt(100)
    cond, uncond = weighted_conditioning(model, [prompt, "a cat"], ["blurry", "(ugly:1.3) " + long_prompt(160)])
    assert cond.shape == uncond.shape == (2, 77 * 3, 32)  # 160 + 6 tokens need 3 chunks
    empty = sd1_encoder([""])
    assert torch.equal(cond[1:, :77], sd1_encoder(["a cat"]))
    assert torch.equal(cond[1:, 77:154], empty) and torch.equal(cond[1:, 154:], empty)
    assert torch.equal(cond[:1, 154:], empty) and torch.equal(uncond[:1, 77:154], empty)
    assert torch.equal(uncond[:1, :77], sd1_encoder(["blurry"]))
    plain_cond, no_uncond = weighted_conditioning(model, ["a cat"])
    assert no_uncond is None and torch.equal(plain_cond, sd1_encoder(["a cat"]))


def test_offloaded_text_encoder_moves_to_the_device_for_weighted_prompts(tiny_checkpoint, tiny_config):
    from ldm import optimize
    from ldm.loading import load_model

    model = load_model(tiny_checkpoint, tiny_config)
    prompts, negatives = ["a (red:1.2) castle BREAK at dusk"], ["blurry"]
    expected = weighted_conditioning(model, prompts, negatives)
    offload = optimize.enable_model_offload(model, "cpu", record=True)
    offloaded = weighted_conditioning(model, prompts, negatives)
    assert offload.events == [("text encoder", "device")]
    assert all(torch.equal(got, want) for got, want in zip(offloaded, expected))
    assert expected[0].shape == (1, 154, 32)


@pytest.fixture(scope="module")
def sdxl(tiny_xl_checkpoints):
    from ldm.loading import load_model

    return load_model(tiny_xl_checkpoints["xl"], TEST_CONFIGS / "tiny-xl.yaml")


def test_sdxl_chunks_both_encoders_and_pools_the_first_chunk(sdxl):
    size = {"original_size": (64, 64), "target_size": (64, 64)}
    prompt = long_prompt(100)
    first = " ".join(prompt.split()[:75])
    cond, uncond = weighted_conditioning(sdxl, [prompt], [""], **size)
    assert cond["crossattn"].shape == (1, 154, 64) and cond["vector"].shape == (1, 64)
    plain_first = sdxl.get_learned_conditioning([first], **size)
    assert torch.equal(cond["crossattn"][:, :77], plain_first["crossattn"])
    assert torch.equal(cond["vector"], plain_first["vector"])  # pooled from chunk 1, sizes as without weighting
    assert not torch.equal(cond["crossattn"][:, 77:], plain_first["crossattn"])
    # an empty negative prompt is zeros, as without weighting, now for every chunk; the sizes stay
    plain_uncond = sdxl.get_unconditional_conditioning([""], **size)
    assert uncond["crossattn"].shape == (1, 154, 64) and not uncond["crossattn"].any()
    assert torch.equal(uncond["vector"], plain_uncond["vector"])
    short, short_uncond = weighted_conditioning(sdxl, ["a red castle"], ["blurry"], **size)
    assert torch.equal(short["crossattn"], sdxl.get_learned_conditioning(["a red castle"], **size)["crossattn"])
    assert torch.equal(short_uncond["vector"], sdxl.get_unconditional_conditioning(["blurry"], **size)["vector"])


def test_cli_flag_reads_weights_records_them_and_metadata_from_reapplies_them(txt2img, tmp_path):
    prompt = "(a red castle:1.3), [blurry], " + long_prompt(90)
    status, _, err = txt2img("--prompt", prompt, outdir=tmp_path / "plain")
    assert status == 0
    assert "uses A1111 weighting syntax" in err and "--prompt_weighting" in err and "is ignored" in err
    status, _, err = txt2img("--prompt", prompt, "--prompt_weighting", outdir=tmp_path / "weighted")
    assert status == 0 and "weighting syntax" not in err and "is ignored" not in err
    sidecar = tmp_path / "weighted/samples/00000.yaml"
    assert yaml.safe_load(sidecar.read_text())["prompt_weighting"] is True
    assert "prompt_weighting" not in yaml.safe_load((tmp_path / "plain/samples/00000.yaml").read_text())
    with Image.open(tmp_path / "weighted/samples/00000.png") as image:
        assert "Prompt weighting: true" in image.info["parameters"].rsplit("\n", 1)[-1]
        weighted = torch.from_numpy(np.asarray(image).copy())
    with Image.open(tmp_path / "plain/samples/00000.png") as image:
        assert not torch.equal(weighted, torch.from_numpy(np.asarray(image).copy()))
    png = tmp_path / "weighted/samples/00000.png"
    status, _, err = txt2img("--metadata_from", str(png), outdir=tmp_path / "again")
    assert status == 0 and "weighting syntax" not in err
    assert yaml.safe_load((tmp_path / "again/samples/00000.yaml").read_text())["prompt_weighting"] is True
    with Image.open(tmp_path / "again/samples/00000.png") as image:
        assert torch.equal(weighted, torch.from_numpy(np.asarray(image).copy()))
    status, _, err = txt2img("--prompt", "a (cat:1.2.3)", "--prompt_weighting", outdir=tmp_path / "bad")
    assert status == 2 and "is not a number" in err and not (tmp_path / "bad").exists()
