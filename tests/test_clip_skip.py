"""AUTOMATIC1111's "Clip skip" against transformers' CLIPTextModel hidden states on the same random weights: SD 1.x
takes `hidden_states[-N]` then the final layer norm; SD 2.x and SDXL's OpenCLIP ignore it (A1111 does); SDXL's CLIP
ViT-L takes `hidden_states[-N]` without the norm only with A1111's "Clip skip SDXL" option. Clip skip 1, and the
default of no clip skip, change no bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoint_factory import TEST_CONFIGS
from ldm.modules.encoders.modules import (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, check_clip_skip,
                                          clip_skip_encoders, use_clip_skip)
from ldm.modules.encoders.prompt_weighting import encode_weighted, weighted_conditioning
from reference_text import for_transformers, hf_text_config

transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

PROMPTS = ["a photograph of an astronaut riding a horse", "", "Portrait of a cat, 8k, highly detailed!!! café"]
TOLERANCE = 1e-5  # relative to the reference's largest magnitude
XL_SIZE = {"original_size": (64, 64), "target_size": (64, 64)}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight from a seeded generator; norm scales near 1 so that a missing or extra norm shows."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in sorted(module.named_parameters()):
        is_norm_scale = "norm" in name and name.endswith("weight")
        parameter.normal_(1.0 if is_norm_scale else 0.0, 0.1 if is_norm_scale else 0.2, generator=generator)
    return module


def max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def transformers_twin(embedder: FrozenCLIPEmbedder) -> torch.nn.Module:
    """transformers' CLIPTextModel with `embedder`'s weights, converted by diffusers' SD 1.x converter."""
    text_model = embedder.transformer.text_model
    width, layers = text_model.final_layer_norm.normalized_shape[0], text_model.num_layers
    heads = text_model.encoder.layers[0].self_attn.heads
    checkpoint = {"cond_stage_model." + key: value for key, value in embedder.state_dict().items()}
    converted = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)
    reference = transformers.CLIPTextModel(hf_text_config(width, layers, heads, "quick_gelu")).eval()
    reference.load_state_dict(for_transformers(reference, converted), strict=True)
    return reference


def final_layer_norm(reference: torch.nn.Module) -> torch.nn.Module:
    return getattr(reference, "text_model", reference).final_layer_norm  # transformers 5 has no text_model wrapper


# --- SD 1.x --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_pair():
    ours = randomize_(FrozenCLIPEmbedder(width=32, layers=4, heads=2), seed=0)
    return ours, transformers_twin(ours)


@pytest.mark.parametrize("clip_skip", [1, 2, 3, 5])
@torch.no_grad()
def test_sd1_clip_skip_is_the_hidden_state_n_from_the_end_then_the_final_norm(sd1_pair, clip_skip):
    ours, reference = sd1_pair
    hidden = reference(input_ids=ours.tokenize(PROMPTS), output_hidden_states=True).hidden_states
    expected = final_layer_norm(reference)(hidden[-clip_skip])  # 5 = layers + 1: the embeddings
    ours.clip_skip = clip_skip
    try:
        assert max_error(ours(PROMPTS), expected) < TOLERANCE
    finally:
        ours.clip_skip = None


@torch.no_grad()
def test_sd1_clip_skip_1_is_the_plain_encoding_bit_for_bit_and_others_differ(sd1_pair):
    ours, reference = sd1_pair
    plain = ours(PROMPTS)
    assert max_error(plain, reference(input_ids=ours.tokenize(PROMPTS)).last_hidden_state) < TOLERANCE
    encoded = {}
    for clip_skip in (1, 2, 3):
        ours.clip_skip = clip_skip
        encoded[clip_skip] = ours(PROMPTS)
    ours.clip_skip = None
    assert torch.equal(encoded[1], plain)
    assert max_error(encoded[2], plain) > 0.05 and max_error(encoded[3], encoded[2]) > 0.05


def test_clip_skip_values_are_checked():
    encoder = FrozenCLIPEmbedder(width=32, layers=4, heads=2)
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match=r"must be a whole number of at least 1"):
            encoder.clip_skip = bad
    with pytest.raises(ValueError, match=r"clip_skip=6 is more than this text encoder's 4 layers \+ 1 .* 1\.\.5"):
        encoder.clip_skip = 6
    with pytest.raises(ValueError, match="clip_skip=6"):
        FrozenCLIPEmbedder(width=32, layers=4, heads=2, clip_skip=6)
    assert encoder.clip_skip is None and FrozenCLIPEmbedder(width=32, layers=4, heads=2, clip_skip=5).clip_skip == 5
    with pytest.raises(ValueError, match="pooled"):
        FrozenCLIPEmbedder(width=32, layers=4, heads=2, layer="pooled").clip_skip = 2
    assert check_clip_skip(12, 12) == 12


@pytest.fixture(scope="module")
def sd1_model(tiny_checkpoint, tiny_config):
    from ldm.loading import load_model

    return load_model(tiny_checkpoint, tiny_config)


@torch.no_grad()
def test_use_clip_skip_sets_sd1s_encoder_for_the_block_only(sd1_model):
    encoder = sd1_model.cond_stage_model
    plain = sd1_model.get_learned_conditioning(PROMPTS)
    with use_clip_skip(sd1_model, 2) as applied:
        assert applied == [encoder] and encoder.clip_skip == 2
        skipped = sd1_model.get_learned_conditioning(PROMPTS)
    assert encoder.clip_skip is None and torch.equal(sd1_model.get_learned_conditioning(PROMPTS), plain)
    reference = transformers_twin(encoder)
    hidden = reference(input_ids=encoder.tokenize(PROMPTS), output_hidden_states=True).hidden_states
    assert max_error(skipped, final_layer_norm(reference)(hidden[-2])) < TOLERANCE
    with pytest.raises(RuntimeError), use_clip_skip(sd1_model, 3):
        raise RuntimeError("interrupted")
    assert encoder.clip_skip is None  # restored after an error too
    with pytest.raises(ValueError, match="at least 1"), use_clip_skip(sd1_model, 0):
        pass


@torch.no_grad()
def test_weighted_conditioning_takes_clip_skip(sd1_model):
    prompts, negatives = ["a (red:1.3) castle BREAK at dusk", "a cat"], ["blurry", ""]
    plain = weighted_conditioning(sd1_model, prompts, negatives)
    assert all(torch.equal(got, want) for got, want in zip(weighted_conditioning(sd1_model, prompts, negatives,
                                                                                 clip_skip=1), plain))
    cond, uncond = weighted_conditioning(sd1_model, prompts, negatives, clip_skip=2)
    with use_clip_skip(sd1_model, 2):
        assert torch.equal(cond, encode_weighted(sd1_model.cond_stage_model, prompts, 2))
        assert torch.equal(uncond[:, :77], sd1_model.get_learned_conditioning(negatives))  # unweighted, 1 chunk
    assert sd1_model.cond_stage_model.clip_skip is None
    assert max_error(cond, plain[0]) > 0.05


# --- SD 2.x: A1111 ignores clip skip -----------------------------------------------------------------------------


@torch.no_grad()
def test_sd2_ignores_clip_skip_as_a1111_does(tiny_checkpoints):
    from ldm.loading import load_model

    model = load_model(tiny_checkpoints["v2", ".safetensors"], TEST_CONFIGS / "tiny-v2.yaml")
    assert isinstance(model.cond_stage_model, FrozenOpenCLIPEmbedder)
    plain = model.get_learned_conditioning(PROMPTS)
    assert clip_skip_encoders(model) == clip_skip_encoders(model, sdxl_clip_l_skip=True) == []
    with use_clip_skip(model, 3) as applied:
        assert applied == [] and torch.equal(model.get_learned_conditioning(PROMPTS), plain)
    cond, _ = weighted_conditioning(model, PROMPTS, None, clip_skip=3)
    assert torch.equal(cond, weighted_conditioning(model, PROMPTS, None)[0])


# --- SDXL: the CLIP ViT-L / OpenCLIP ViT-bigG pair ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tiny_xl_checkpoints):
    from ldm.loading import load_model

    model = load_model(tiny_xl_checkpoints["xl"], TEST_CONFIGS / "tiny-xl.yaml")
    clip_l = model.conditioner.embedders[0]
    assert isinstance(clip_l, FrozenCLIPEmbedder) and clip_l.layer == "hidden" and clip_l.layer_idx == 2
    return model


@torch.no_grad()
def test_sdxl_ignores_clip_skip_without_the_sdxl_option(sdxl):
    plain = sdxl.get_learned_conditioning(PROMPTS, **XL_SIZE)
    for clip_skip in (1, 3):
        with use_clip_skip(sdxl, clip_skip) as applied:
            assert applied == []
            skipped = sdxl.get_learned_conditioning(PROMPTS, **XL_SIZE)
        assert all(torch.equal(skipped[key], plain[key]) for key in plain)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
@torch.no_grad()
def test_sdxl_option_skips_clip_l_without_the_final_norm_and_leaves_open_clip(sdxl, clip_skip):
    clip_l = sdxl.conditioner.embedders[0]
    width = clip_l.transformer.text_model.final_layer_norm.normalized_shape[0]
    plain = sdxl.get_learned_conditioning(PROMPTS, **XL_SIZE)
    with use_clip_skip(sdxl, clip_skip, sdxl_clip_l_skip=True) as applied:
        assert applied == [clip_l]
        skipped = sdxl.get_learned_conditioning(PROMPTS, **XL_SIZE)
    assert clip_l.clip_skip is None
    reference = transformers_twin(clip_l)
    hidden = reference(input_ids=clip_l.tokenize(PROMPTS), output_hidden_states=True).hidden_states
    assert max_error(skipped["crossattn"][..., :width], hidden[-clip_skip]) < TOLERANCE
    assert torch.equal(skipped["crossattn"][..., width:], plain["crossattn"][..., width:])  # OpenCLIP ViT-bigG
    assert torch.equal(skipped["vector"], plain["vector"])  # pooled from OpenCLIP, plus the sizes
    # the configured layer is hidden_states[2] of 3 layers = [-2]: A1111's clip skip 2 under the option changes nothing
    assert torch.equal(skipped["crossattn"], plain["crossattn"]) is (clip_skip == 2)


@torch.no_grad()
def test_sdxl_weighted_conditioning_takes_clip_skip_and_the_option(sdxl):
    prompts, negatives = ["a (red:1.3) castle, at dusk"], ["blurry"]
    plain = weighted_conditioning(sdxl, prompts, negatives, **XL_SIZE)
    ignored = weighted_conditioning(sdxl, prompts, negatives, clip_skip=3, **XL_SIZE)
    assert all(torch.equal(got[key], want[key]) for got, want in zip(ignored, plain) for key in want)
    cond, uncond = weighted_conditioning(sdxl, prompts, negatives, clip_skip=3, sdxl_clip_l_skip=True, **XL_SIZE)
    with use_clip_skip(sdxl, 3, sdxl_clip_l_skip=True):
        expected = weighted_conditioning(sdxl, prompts, negatives, **XL_SIZE)
    assert all(torch.equal(got[key], want[key]) for got, want in zip((cond, uncond), expected) for key in want)
    assert not torch.equal(cond["crossattn"], plain[0]["crossattn"])
    # the option alone is A1111's clip skip 1 with it: the last layer of CLIP ViT-L, without the final norm
    alone = weighted_conditioning(sdxl, prompts, None, sdxl_clip_l_skip=True, **XL_SIZE)[0]
    assert torch.equal(alone["crossattn"], weighted_conditioning(sdxl, prompts, None, clip_skip=1,
                                                                 sdxl_clip_l_skip=True, **XL_SIZE)[0]["crossattn"])
    assert all(embedder.clip_skip is None for embedder in clip_skip_encoders(sdxl, sdxl_clip_l_skip=True))


@torch.no_grad()
def test_requests_and_the_script_take_the_sdxl_option_and_record_it(sdxl, tiny_xl_checkpoints, tmp_path, capsys):
    """`Request(clip_skip_sdxl=True)` conditions as `use_clip_skip(..., sdxl_clip_l_skip=True)`; txt2img's
    --clip_skip_sdxl writes "Clip skip SDXL: true", which --metadata_from applies again."""
    from PIL import Image

    from ldm.cli.txt2img import main
    from ldm.pipeline import Pipeline, Request

    pipeline = Pipeline.from_checkpoint(str(tiny_xl_checkpoints["xl"]), str(TEST_CONFIGS / "tiny-xl.yaml"),
                                        hash_files=False)
    request = Request(PROMPTS[0], steps=2, sampler="euler", clip_skip=3, clip_skip_sdxl=True, height=64, width=64)
    cond, _ = pipeline.conditioning(request)
    with use_clip_skip(pipeline.model, 3, sdxl_clip_l_skip=True):
        expected, _ = pipeline.encode(request, pipeline.model)
    assert torch.equal(cond["crossattn"], expected["crossattn"])
    plain, _ = pipeline.conditioning(request.replace(clip_skip_sdxl=False))
    assert not torch.equal(cond["crossattn"], plain["crossattn"])

    flags = ["--ckpt", str(tiny_xl_checkpoints["xl"]), "--config", str(TEST_CONFIGS / "tiny-xl.yaml"), "--H", "64",
             "--W", "64", "--ddim_steps", "2", "--sampler", "euler", "--n_samples", "1", "--n_iter", "1"]
    assert main([*flags, "--prompt", PROMPTS[0], "--clip_skip", "3", "--clip_skip_sdxl", "--outdir",
                 str(tmp_path / "first")]) == 0
    first = tmp_path / "first" / "samples" / "00000.png"
    assert "Clip skip: 3" in Image.open(first).text["parameters"]
    assert "Clip skip SDXL: true" in Image.open(first).text["parameters"]
    assert "ignores clip skip" not in capsys.readouterr().err
    assert main([*flags, "--metadata_from", str(first), "--outdir", str(tmp_path / "again")]) == 0
    again = tmp_path / "again" / "samples" / "00000.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert main([*flags, "--prompt", PROMPTS[0], "--clip_skip", "3", "--outdir", str(tmp_path / "without")]) == 0
    assert not np.array_equal(np.asarray(Image.open(first)),
                              np.asarray(Image.open(tmp_path / "without" / "samples" / "00000.png")))
