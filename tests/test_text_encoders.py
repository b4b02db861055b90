"""Text encoders against transformers' CLIP on the same random weights, converted with diffusers' own
checkpoint converters, plus the key layout and sizes of the released SD 1.x / SD 2.x text encoders."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from reference_text import for_transformers, hf_text_config

transformers = pytest.importorskip("transformers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "Portrait of a cat, 8k, highly detailed!!! café <b> 東京",
    "a very long prompt " * 30,
]
# float32 through up to 24 blocks: the residual stream grows to tens, so the bound is relative to its size
TOLERANCE = 5e-6  # measured: at most 9e-7


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Fill every weight from a seeded generator; norm scales near 1 so that a wrong norm still shows."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in sorted(module.named_parameters()):
        is_norm_scale = ("norm" in name or ".ln_" in name) and name.endswith("weight")
        parameter.normal_(1.0 if is_norm_scale else 0.0, 0.1 if is_norm_scale else scale, generator=generator)
    return module


def max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, relative to the reference's largest magnitude."""
    assert ours.shape == reference.shape
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def prefixed(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in module.state_dict().items()}


# --- SD 1.x: FrozenCLIPEmbedder vs transformers CLIPTextModel -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_pair():
    ours = randomize_(FrozenCLIPEmbedder(width=64, layers=3, heads=4), seed=0)
    converted = single_file_utils.convert_ldm_clip_checkpoint(prefixed(ours, "cond_stage_model."))
    reference = transformers.CLIPTextModel(hf_text_config(64, 3, 4, "quick_gelu")).eval()
    reference.load_state_dict(for_transformers(reference, converted), strict=True)
    return ours, reference


@pytest.mark.parametrize("layer, layer_idx", [("last", None), ("pooled", None), ("hidden", -2), ("hidden", 1)])
@torch.no_grad()
def test_clip_embedder_matches_transformers(tiny_clip_pair, layer, layer_idx):
    ours, reference = tiny_clip_pair
    ours.layer, ours.layer_idx = layer, layer_idx
    tokens = ours.tokenize(PROMPTS)
    expected = reference(input_ids=tokens, output_hidden_states=True)
    if layer == "last":
        target = expected.last_hidden_state
    elif layer == "pooled":
        target = expected.pooler_output[:, None, :]
    else:
        target = expected.hidden_states[layer_idx]
    result = ours(PROMPTS)
    assert result.shape == ((4, 1, 64) if layer == "pooled" else (4, 77, 64))
    assert max_error(result, target) < TOLERANCE
    ours.layer, ours.layer_idx = "last", None


def test_clip_embedder_output_differs_between_layers(tiny_clip_pair):
    """Guards the parity test above against comparing a tensor with itself."""
    ours, _ = tiny_clip_pair
    with torch.no_grad():
        last = ours(PROMPTS[:1])
        ours.layer, ours.layer_idx = "hidden", -2
        hidden = ours(PROMPTS[:1])
    ours.layer, ours.layer_idx = "last", None
    assert max_error(last, hidden) > 0.1


def test_clip_embedder_is_frozen_and_follows_weight_dtype(tiny_clip_pair):
    ours, _ = tiny_clip_pair
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    with torch.no_grad():
        full = ours(PROMPTS[:2])
        half = ours.to(torch.bfloat16)(PROMPTS[:2])
    ours.to(torch.float32)
    assert half.dtype == torch.bfloat16
    assert max_error(half.float(), full) < 0.05


def test_clip_embedder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown text encoder 'openai/clip-vit-huge'"):
        FrozenCLIPEmbedder(version="openai/clip-vit-huge")
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(layer="hidden", width=32, layers=2, heads=2)
    with pytest.raises(ValueError, match="layer 'penultimate'"):
        FrozenCLIPEmbedder(layer="penultimate", width=32, layers=2, heads=2)
    with pytest.raises(ValueError, match="max_length=78"):
        FrozenCLIPEmbedder(max_length=78, width=32, layers=2, heads=2)


# --- SD 2.x / SDXL: OpenCLIP text tower vs transformers, through diffusers' open_clip converter --------------


@pytest.fixture(scope="module")
def tiny_open_clip():
    # 24 blocks as ViT-H, so diffusers' converter drops block 23 exactly as it does for a real SD 2.x checkpoint
    return randomize_(FrozenOpenCLIPEmbedder(width=32, layers=24, heads=4, embed_dim=24, layer="penultimate"), seed=1)


@torch.no_grad()
def test_open_clip_penultimate_matches_diffusers_sd2_text_encoder(tiny_open_clip):
    checkpoint = prefixed(tiny_open_clip, "cond_stage_model.")
    # diffusers' SD 2.x text encoder is the 23 blocks the penultimate layer runs, then the final layer norm
    reference = transformers.CLIPTextModel(hf_text_config(32, 23, 4, "gelu")).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(reference, checkpoint)
    reference.load_state_dict(for_transformers(reference, converted), strict=True)
    tokens = tiny_open_clip.tokenize(PROMPTS)
    assert tokens[1, 2:].eq(0).all(), "open_clip pads with 0"
    assert max_error(tiny_open_clip(PROMPTS), reference(input_ids=tokens).last_hidden_state) < TOLERANCE


@torch.no_grad()
def test_open_clip_last_layer_and_sdxl_pooled_match_transformers(tiny_open_clip):
    prefix = "conditioner.embedders.1.model."
    checkpoint = prefixed(tiny_open_clip.model, prefix)
    # under the SDXL prefix nothing is dropped: all 24 blocks and the (transposed) text projection convert
    reference = transformers.CLIPTextModelWithProjection(hf_text_config(32, 24, 4, "gelu", projection_dim=24)).eval()
    converted = single_file_utils.convert_open_clip_checkpoint(reference, checkpoint, prefix=prefix)
    reference.load_state_dict(for_transformers(reference, converted), strict=True)
    tokens = tiny_open_clip.tokenize(PROMPTS)
    expected = reference(input_ids=tokens, output_hidden_states=True)

    last = FrozenOpenCLIPEmbedder(width=32, layers=24, heads=4, embed_dim=24, layer="last")
    last.load_state_dict(tiny_open_clip.state_dict(), strict=True)
    assert max_error(last(PROMPTS), expected.last_hidden_state) < TOLERANCE

    sdxl = FrozenOpenCLIPEmbedder2(width=32, layers=24, heads=4, embed_dim=24, layer="penultimate",
                                   always_return_pooled=True, legacy=False)
    sdxl.load_state_dict(tiny_open_clip.state_dict(), strict=True)
    penultimate, pooled = sdxl(PROMPTS)
    assert max_error(penultimate, expected.hidden_states[-2]) < TOLERANCE
    assert pooled.shape == (4, 24)
    assert max_error(pooled, expected.text_embeds) < TOLERANCE

    legacy = FrozenOpenCLIPEmbedder2(width=32, layers=24, heads=4, embed_dim=24, layer="penultimate")
    legacy.load_state_dict(tiny_open_clip.state_dict(), strict=True)
    assert torch.equal(legacy(PROMPTS), tiny_open_clip(PROMPTS))


def test_open_clip_embedder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown text encoder 'ViT-X-99'"):
        FrozenOpenCLIPEmbedder(arch="ViT-X-99")
    with pytest.raises(ValueError, match="layer 'hidden'"):
        FrozenOpenCLIPEmbedder(layer="hidden", width=32, layers=2, heads=2)
    with pytest.raises(ValueError, match="legacy=False"):
        FrozenOpenCLIPEmbedder2(always_return_pooled=True, width=32, layers=2, heads=2)


# --- released sizes: built on the meta device, so no memory or time is spent -----------------------------------


def test_sd1_text_encoder_layout_equals_the_released_checkpoint():
    with torch.device("meta"):
        ours = FrozenCLIPEmbedder()
        reference = transformers.CLIPTextModel(hf_text_config(768, 12, 12, "quick_gelu"))
    state = ours.state_dict()
    assert sum(p.numel() for p in ours.transformer.parameters()) == 123_060_480
    assert state["transformer.text_model.encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)
    assert state["transformer.text_model.embeddings.position_embedding.weight"].shape == (77, 768)
    assert "transformer.text_model.embeddings.position_ids" not in state
    converted = single_file_utils.convert_ldm_clip_checkpoint(prefixed(ours, "cond_stage_model."))
    assert {key: value.shape for key, value in for_transformers(reference, converted).items()} == {
        key: value.shape for key, value in reference.state_dict().items()}


def test_sd2_text_encoder_layout_equals_the_released_checkpoint():
    with torch.device("meta"):
        ours = FrozenOpenCLIPEmbedder(layer="penultimate")
        reference = transformers.CLIPTextModel(hf_text_config(1024, 23, 16, "gelu"))
    checkpoint = prefixed(ours, "cond_stage_model.")
    assert checkpoint["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"].shape == (3072, 1024)
    assert checkpoint["cond_stage_model.model.text_projection"].shape == (1024, 1024)
    assert checkpoint["cond_stage_model.model.positional_embedding"].shape == (77, 1024)
    assert checkpoint["cond_stage_model.model.logit_scale"].shape == ()
    assert set(single_file_utils.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE) <= set(checkpoint)
    assert len(checkpoint) == 6 + 24 * 12
    converted = single_file_utils.convert_open_clip_checkpoint(reference, checkpoint)
    assert {key: value.shape for key, value in for_transformers(reference, converted).items()} == {
        key: value.shape for key, value in reference.state_dict().items()}


@pytest.mark.parametrize("embedder", [FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder])
@torch.no_grad()
def test_released_size_forward_is_finite(embedder):
    with torch.device("meta"):
        model = embedder()
    model.to_empty(device="cpu")
    randomize_(model, seed=2, scale=0.02)  # CLIP's initialisation scale, so activations stay O(1)
    out = model(["a photograph of an astronaut riding a horse"])
    width = 768 if embedder is FrozenCLIPEmbedder else 1024
    assert out.shape == (1, 77, width)
    assert torch.isfinite(out).all()
