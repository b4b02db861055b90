"""The diffusion UNet against diffusers' UNet2DConditionModel on the same random weights, and its key layout
against the released SD 1.x / 2.x checkpoints (through diffusers' own LDM -> diffusers key converter)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from diffusers.models.embeddings import get_timestep_embedding

from ldm.modules.attention import CrossAttention, SpatialTransformer, attention
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, UNetModel
from ldm.modules.diffusionmodules.util import GroupNorm32, make_beta_schedule, timestep_embedding
from ldm.util import strip_ignored_keys

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "stable-diffusion"
PREFIX = "model.diffusion_model."

TINY_BASE = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, channel_mult=[1, 2, 2],
    use_spatial_transformer=True, transformer_depth=1, legacy=False,
)
TINY_CONFIGS = {
    # SD 1.x layout: head count fixed, 1x1-conv projections, no attention at the lowest resolution.
    "v1": dict(TINY_BASE, attention_resolutions=[2, 1], num_heads=2, context_dim=24),
    # SD 2.x layout: head width fixed, Linear projections; also cross-attention-only first blocks.
    "v2": dict(TINY_BASE, attention_resolutions=[4, 2, 1], num_head_channels=16, use_linear_in_transformer=True,
               context_dim=32, disable_self_attentions=[True, False, False]),
    # SDXL layout: per-level transformer depth, no attention at full resolution, vector conditioning `y`.
    "sdxl": dict(TINY_BASE, attention_resolutions=[4, 2], num_head_channels=16, use_linear_in_transformer=True,
                 context_dim=40, transformer_depth=[1, 1, 2], num_classes="sequential", adm_in_channels=12),
    # class-conditional: integer labels through nn.Embedding
    "classes": dict(TINY_BASE, attention_resolutions=[2], num_heads=4, context_dim=16, legacy=True, num_classes=5),
}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter, the zero-initialised output layers included, drawn at random so that parity can fail.

    Matrices get unit gain (std 1/sqrt(fan_in)) so that deep branches still move the output; vectors (norm
    scales, biases) get a wide spread around 1 and 0 so that a swapped scale and bias shows.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() >= 2:
                parameter.copy_(noise / math.sqrt(parameter[0].numel()))
            elif name.endswith("weight"):
                parameter.copy_(1 + 0.3 * noise)
            else:
                parameter.copy_(0.3 * noise)
    return module


def original_config(unet_params: dict) -> dict:
    """The yaml-shaped dict diffusers' single-file converter reads."""
    return {"model": {"params": {
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}


def released_unet_params(name: str) -> dict:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    return strip_ignored_keys(config["model"]["params"]["unet_config"]["params"])


def convert_to_diffusers(unet_params: dict, state_dict: dict) -> tuple[dict, dict]:
    """(diffusers config, converted state dict), checking that the converter consumed every one of our tensors."""
    checkpoint = {PREFIX + key: value for key, value in state_dict.items()}
    config = create_unet_diffusers_config_from_ldm(original_config(unet_params), checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    # The converter moves tensors without copying: each of ours must appear exactly once under a new name.
    assert len(converted) == len(checkpoint)
    assert {id(value) for value in converted.values()} == {id(value) for value in checkpoint.values()}
    return config, converted


def tiny_pair(name: str, seed: int = 0) -> tuple[UNetModel, UNet2DConditionModel]:
    params = TINY_CONFIGS[name]
    ours = randomize_(UNetModel(**params), seed).eval()
    config, converted = convert_to_diffusers(params, ours.state_dict())
    reference = UNet2DConditionModel(**config).eval()
    reference.load_state_dict(converted, strict=True)
    return ours, reference


def tiny_inputs(params: dict, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(2, 4, 8, 12, generator=generator),  # non-square, to catch swapped H and W
        "timesteps": torch.tensor([17.0, 873.0]),
        "context": torch.randn(2, 7, params["context_dim"], generator=generator),
    }
    if params.get("num_classes") == "sequential":
        inputs["y"] = torch.randn(2, params["adm_in_channels"], generator=generator)
    elif isinstance(params.get("num_classes"), int):
        inputs["y"] = torch.tensor([3, 0])
    return inputs


def run_reference(reference: UNet2DConditionModel, inputs: dict) -> torch.Tensor:
    return reference(inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"],
                     class_labels=inputs.get("y")).sample


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_unet_matches_diffusers(name: str) -> None:
    ours, reference = tiny_pair(name)
    inputs = tiny_inputs(TINY_CONFIGS[name])
    with torch.no_grad():
        expected = run_reference(reference, inputs)
        actual = ours(**inputs)
    assert actual.shape == expected.shape == inputs["x"].shape
    scale = expected.abs().max().item()
    assert scale > 1e-2  # random weights give a non-trivial output
    max_abs_diff = (actual - expected).abs().max().item()
    assert max_abs_diff <= 1e-5 * scale, f"{name}: max abs diff {max_abs_diff:.3g} at output scale {scale:.3g}"


def test_parity_check_detects_a_changed_weight() -> None:
    ours, reference = tiny_pair("v1")
    inputs = tiny_inputs(TINY_CONFIGS["v1"])
    with torch.no_grad():
        # a small change deep inside: the middle block's cross-attention values
        ours.middle_block[1].transformer_blocks[0].attn2.to_v.weight.mul_(1.1)
        difference = (ours(**inputs) - run_reference(reference, inputs)).abs().max().item()
    assert difference > 10 * 1e-5 * run_reference(reference, inputs).abs().max().item()


def test_transformer_depth_list_and_middle_depth() -> None:
    unet = UNetModel(**TINY_CONFIGS["sdxl"])
    assert len(unet.input_blocks[4][1].transformer_blocks) == 1  # level 1
    assert len(unet.input_blocks[7][1].transformer_blocks) == 2  # level 2
    assert len(unet.middle_block[1].transformer_blocks) == 2  # middle defaults to the deepest level
    assert len(unet.output_blocks[0][1].transformer_blocks) == 2
    assert len(unet.input_blocks[1]) == 1  # no attention at full resolution
    assert tuple(unet.state_dict()["label_emb.0.0.weight"].shape) == (128, 12)
    assert tuple(unet.state_dict()["label_emb.0.2.weight"].shape) == (128, 128)
    unet = UNetModel(**dict(TINY_CONFIGS["sdxl"], transformer_depth_middle=3))
    assert len(unet.middle_block[1].transformer_blocks) == 3


def test_y_required_exactly_for_class_conditional_models() -> None:
    params = TINY_CONFIGS["sdxl"]
    unet = UNetModel(**params)
    inputs = tiny_inputs(params)
    del inputs["y"]
    with pytest.raises(ValueError, match="num_classes"):
        unet(**inputs)
    with pytest.raises(ValueError, match="num_classes"):
        UNetModel(**TINY_CONFIGS["v1"])(**tiny_inputs(TINY_CONFIGS["v1"]), y=torch.zeros(2, 12))


def test_weight_dtype_sets_compute_dtype_and_output_follows_x() -> None:
    params = TINY_CONFIGS["v2"]
    unet = randomize_(UNetModel(**params), seed=3).eval()
    inputs = tiny_inputs(params)
    with torch.no_grad():
        expected = unet(**inputs)
        unet.to(torch.bfloat16)
        actual = unet(**inputs)
    assert actual.dtype == torch.float32
    assert (actual - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_context_list_gives_one_context_per_block() -> None:
    generator = torch.Generator().manual_seed(4)
    transformer = randomize_(SpatialTransformer(32, 2, 16, depth=2, context_dim=[8, 12], use_linear=True), seed=4)
    x = torch.randn(1, 32, 3, 5, generator=generator)
    first, second = torch.randn(1, 6, 8, generator=generator), torch.randn(1, 4, 12, generator=generator)
    assert transformer.transformer_blocks[1].attn2.to_k.weight.shape == (32, 12)
    with torch.no_grad():
        out = transformer(x, [first, second])
        block_by_block = transformer.proj_in(transformer.norm(x).flatten(2).transpose(1, 2))
        block_by_block = transformer.transformer_blocks[0](block_by_block, first)
        block_by_block = transformer.transformer_blocks[1](block_by_block, second)
        block_by_block = transformer.proj_out(block_by_block).transpose(1, 2).reshape(1, 32, 3, 5) + x
    torch.testing.assert_close(out, block_by_block)


# Released SD 1.x / 2.x / XL configs at full size, built without memory on the meta device.

RELEASED_SHAPES = {
    "v1-inference": {
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "middle_block.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
        "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight": (640, 640),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "output_blocks.3.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    },
    "v2-inference": {
        "input_blocks.1.1.proj_in.weight": (320, 320),
        "input_blocks.1.1.proj_out.weight": (320, 320),
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "middle_block.1.proj_in.weight": (1280, 1280),
        "out.2.weight": (4, 320, 3, 3),
    },
}
RELEASED_SHAPES["sdxl-base"] = {
    "label_emb.0.0.weight": (1280, 2816),
    "label_emb.0.2.weight": (1280, 1280),
    "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
}
PARAMETER_COUNTS = {"v1-inference": 859_520_964, "v2-inference": 865_910_724, "sdxl-base": 2_567_463_684}
# sd_xl_base.yaml targets sgm's UNet (no use_spatial_transformer flag); these are its network_config params.
SDXL_BASE_PARAMS = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=2, channel_mult=[1, 2, 4],
    attention_resolutions=[4, 2], num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
    transformer_depth=[1, 2, 10], context_dim=2048, legacy=False, num_classes="sequential", adm_in_channels=2816,
)


@pytest.mark.parametrize("name", sorted(RELEASED_SHAPES))
def test_released_config_key_layout(name: str) -> None:
    params = SDXL_BASE_PARAMS if name == "sdxl-base" else released_unet_params(name)
    with torch.device("meta"):
        unet = UNetModel(**params)
    state = unet.state_dict()
    assert sum(p.numel() for p in unet.parameters()) == PARAMETER_COUNTS[name]
    for key, shape in RELEASED_SHAPES[name].items():
        assert tuple(state[key].shape) == shape, key
    assert not any(key.startswith("id_predictor") for key in state)
    assert any(key.startswith("label_emb") for key in state) == (name == "sdxl-base")

    config, converted = convert_to_diffusers(params, state)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**config)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in converted.items()} == expected


def fill_from_random_pool_(module: torch.nn.Module, seed: int) -> None:
    """Cheap random init for a full-size model: drawing 860M normals takes ~10 s on CPU, so every parameter is
    cut at a random offset from one pool of normals a little longer than the largest parameter."""
    generator = torch.Generator().manual_seed(seed)
    largest = max(parameter.numel() for parameter in module.parameters())
    pool = torch.randn(largest + 2**20, generator=generator)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            count = parameter.numel()
            start = int(torch.randint(pool.numel() - count + 1, (1,), generator=generator))
            values = pool[start:start + count].view(parameter.shape)
            if parameter.dim() >= 2:  # unit gain, so activations neither vanish nor explode
                torch.mul(values, 1 / math.sqrt(parameter[0].numel()), out=parameter)
            elif name.endswith("weight"):  # norm scales
                torch.mul(values, 0.05, out=parameter).add_(1)
            else:
                torch.mul(values, 0.05, out=parameter)


def test_real_size_v1_forward_at_small_resolution() -> None:
    with torch.device("meta"):
        unet = UNetModel(**released_unet_params("v1-inference"))
    unet.to_empty(device="cpu").eval()
    fill_from_random_pool_(unet, seed=5)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([999]),
                   torch.randn(1, 77, 768, generator=generator))
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all()
    assert out.std().item() > 1e-3


# Building blocks against independent references.

def test_timestep_embedding_matches_diffusers() -> None:
    timesteps = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (320, 33):
        expected = get_timestep_embedding(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(timesteps, dim), expected, rtol=0, atol=1e-6)
    assert timestep_embedding(timesteps, 33)[:, -1].abs().max() == 0  # odd width padded with zeros
    assert torch.equal(timestep_embedding(timesteps, 4, repeat_only=True), timesteps[:, None].expand(4, 4))


def test_beta_schedules() -> None:
    scaled_linear = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    assert scaled_linear.dtype == np.float64 and scaled_linear.shape == (1000,)
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").betas.numpy()
    np.testing.assert_allclose(scaled_linear, reference, rtol=1e-6)
    assert scaled_linear[0] == pytest.approx(0.00085, rel=1e-12)
    assert scaled_linear[-1] == pytest.approx(0.012, rel=1e-12)
    np.testing.assert_allclose(make_beta_schedule("sqrt_linear", 10, 0.1, 0.2), np.linspace(0.1, 0.2, 10), rtol=1e-12)
    np.testing.assert_allclose(make_beta_schedule("sqrt", 10, 0.1, 0.2), np.linspace(0.1, 0.2, 10) ** 0.5, rtol=1e-12)
    s, t = 8e-3, np.arange(1001) / 1000
    alpha_bar = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    cosine_reference = np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, 0.999)
    np.testing.assert_allclose(make_beta_schedule("cosine", 1000), cosine_reference, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="scaled"):
        make_beta_schedule("scaled", 10)


def test_group_norm32_computes_in_float32() -> None:
    generator = torch.Generator().manual_seed(6)
    norm = randomize_(GroupNorm32(32, 64), seed=6).half()
    x = (torch.randn(2, 64, 4, 4, generator=generator) * 30 + 100).half()  # a large mean, as deep activations have
    expected = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps)
    actual = norm(x)
    assert actual.dtype == torch.float16
    torch.testing.assert_close(actual.float(), expected, rtol=0, atol=2e-3)


def test_attention_block_head_orders_match_per_head_reference() -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, 3, 4, generator=generator)
    for new_order in (False, True):
        block = randomize_(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order), seed=7).eval()
        with torch.no_grad():
            qkv = block.qkv(block.norm(x.reshape(2, 64, 12)))  # [B, 3C, T]
            if new_order:  # q | k | v, each split into heads
                q, k, v = (part.reshape(8, 16, 12) for part in qkv.chunk(3, dim=1))
            else:  # heads first, each head holding its own q | k | v
                q, k, v = qkv.reshape(8, 48, 12).split(16, dim=1)
            weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 4.0, dim=-1)
            h = torch.einsum("bts,bcs->bct", weights, v).reshape(2, 64, 12)
            expected = (x.reshape(2, 64, 12) + block.proj_out(h)).reshape(x.shape)
            torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_non_transformer_unet_builds_and_runs() -> None:
    params = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                  attention_resolutions=[2], channel_mult=[1, 2], num_heads=2, resblock_updown=True,
                  use_scale_shift_norm=True)
    unet = randomize_(UNetModel(**params), seed=8).eval()
    assert isinstance(unet.middle_block[1], AttentionBlock)
    assert unet.middle_block[1].num_heads == 2
    assert tuple(unet.state_dict()["input_blocks.1.0.emb_layers.1.weight"].shape) == (64, 128)
    with torch.no_grad():
        out = unet(torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(8)), torch.tensor([5]))
    assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()


def overflowing_attention_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q.k of about 90000 in every pair: over the fp16 maximum (65504), yet the softmax is well defined because
    the shared offset cancels, as in SD 2.x."""
    generator = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 16, 64, generator=generator) for _ in range(3))
    q[..., 0] = 300.0
    k[..., 0] = 300.0
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_attention_runs_in_float32_on_cpu(dtype: torch.dtype, monkeypatch) -> None:
    q, k, v = overflowing_attention_inputs(dtype)
    q64, k64, v64 = q.double(), k.double(), v.double()
    expected = torch.softmax(q64 @ k64.transpose(-1, -2) / 8.0, dim=-1) @ v64
    if dtype == torch.float16:  # the naive half-precision computation overflows on these inputs
        assert not torch.isfinite(torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)).all()

    seen_dtypes = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, *args, **kwargs):
        seen_dtypes.append(query.dtype)
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    attention_module = randomize_(CrossAttention(128, heads=2, dim_head=64), seed=9).to(dtype)
    with torch.no_grad():
        actual = attention(q, k, v)
        module_out = attention_module(torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(9)).to(dtype))
    assert seen_dtypes == [torch.float32, torch.float32]
    assert actual.dtype == dtype and module_out.dtype == dtype
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=tolerance)
