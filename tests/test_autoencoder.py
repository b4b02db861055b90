"""KL autoencoder: parity with diffusers on random weights, the released key layout, and the posterior's maths."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
    update_vae_attentions_ldm_to_diffusers,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "stable-diffusion"
PREFIX = "first_stage_model."

# GroupNorm(32) needs every width divisible by 32, hence ch=32
TINY_DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                     num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded random values, far from any default init, so a mis-wired weight shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            elif parameter.ndim == 1:
                parameter.copy_(0.1 * noise)
            else:
                fan_in = math.prod(parameter.shape[1:])
                parameter.copy_(noise / math.sqrt(fan_in))


def ldm_config(ddconfig: dict) -> dict:
    """The slice of a CompVis yaml that diffusers' VAE config converter reads."""
    return {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig, "embed_dim": 4}}}}}


def convert_to_diffusers(state_dict: dict[str, torch.Tensor], ddconfig: dict,
                         attention_levels: tuple[int, ...] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our state dict -> (diffusers AutoencoderKL config, diffusers state dict), via diffusers' own converter.

    The converter maps only the mid-block attention: it always builds (Down|Up)...Block2D without attention, and
    leaves `down.N.attn.M` / `up.N.attn.M` keys under their LDM names. For configs with `attn_resolutions`, the
    attention levels are switched to diffusers' Attn* block types here and those keys are mapped with diffusers'
    own per-attention key helper.
    """
    checkpoint = {PREFIX + key: value for key, value in state_dict.items()}
    config = create_vae_diffusers_config_from_ldm(ldm_config(ddconfig), checkpoint)
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    levels = len(ddconfig["ch_mult"])
    for level in attention_levels:
        config["down_block_types"][level] = "AttnDownEncoderBlock2D"
        # diffusers orders decoder stages deepest first, the reverse of the LDM `up` list
        config["up_block_types"][levels - 1 - level] = "AttnUpDecoderBlock2D"
        for ldm_name, diffusers_name in ((f"encoder.down.{level}.attn", f"encoder.down_blocks.{level}.attentions"),
                                         (f"decoder.up.{level}.attn",
                                          f"decoder.up_blocks.{levels - 1 - level}.attentions")):
            keys = [key for key in state_dict if key.startswith(ldm_name + ".")]
            assert keys, f"expected attention weights under {ldm_name}"
            for key in keys:
                converted.pop(key, None)
            update_vae_attentions_ldm_to_diffusers(keys, converted, state_dict,
                                                   mapping={"old": ldm_name, "new": diffusers_name})
    return config, converted


def build_pair(ddconfig: dict, attention_levels: tuple[int, ...] = (), seed: int = 0):
    ours = AutoencoderKL(ddconfig=ddconfig, embed_dim=4).eval()
    randomize_(ours, seed)
    config, converted = convert_to_diffusers(ours.state_dict(), ddconfig, attention_levels)
    reference = diffusers.AutoencoderKL(**config).eval()
    # strict: a missing or unexpected key fails here rather than leaving a weight at its init
    reference.load_state_dict(converted, strict=True)
    return ours, reference


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn_resolutions, attention_levels", [([], ()), ([16], (1,))],
                         ids=["mid-attention-only", "attention-at-16px"])
def test_matches_diffusers_on_random_weights(attn_resolutions, attention_levels):
    ddconfig = {**TINY_DDCONFIG, "attn_resolutions": attn_resolutions}
    ours, reference = build_pair(ddconfig, attention_levels)
    if attention_levels:
        assert len(ours.encoder.down[1].attn) == 1 and len(ours.decoder.up[1].attn) == 2
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    latents = torch.randn(2, 4, 16, 16, generator=generator)

    with torch.no_grad():
        posterior = ours.encode(images)
        expected = reference.encode(images).latent_dist
        decoded = ours.decode(latents)
        expected_decoded = reference.decode(latents).sample

    assert posterior.mean.shape == (2, 4, 16, 16)
    # the random weights make outputs of order 1-10; a wrong wiring would differ by that much, not by 1e-4
    assert posterior.mean.abs().max() > 0.5 and decoded.abs().max() > 0.5
    assert max_abs_diff(posterior.mean, expected.mean) < 1e-4
    assert max_abs_diff(posterior.logvar, expected.logvar) < 1e-4
    assert max_abs_diff(posterior.std, expected.std) < 1e-4 * (1 + expected.std.abs().max().item())
    assert decoded.shape == (2, 3, 32, 32)
    assert max_abs_diff(decoded, expected_decoded) < 1e-4 * (1 + expected_decoded.abs().max().item())

    with torch.no_grad():
        reconstruction, _ = ours(images, sample_posterior=False)
        expected_reconstruction = reference(images, sample_posterior=False).sample
    assert max_abs_diff(reconstruction, expected_reconstruction) < 1e-4 * (1 + expected_reconstruction.abs().max())


def test_forward_samples_with_the_given_generator():
    ours, _ = build_pair(TINY_DDCONFIG)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        first, posterior = ours(images, generator=torch.Generator().manual_seed(7))
        second, _ = ours(images, generator=torch.Generator().manual_seed(7))
        z = posterior.sample(torch.Generator().manual_seed(7))
        expected = ours.decode(z)
        mean_reconstruction, _ = ours(images, sample_posterior=False)
    assert torch.equal(first, second)
    assert torch.allclose(first, expected, atol=1e-5)
    assert not torch.allclose(first, mean_reconstruction, atol=1e-3)


def test_compute_dtype_follows_weights():
    ours, _ = build_pair(TINY_DDCONFIG)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours.decode(latents)
        ours.to(torch.bfloat16)
        decoded = ours.decode(latents)  # float32 latents into a bfloat16 model
    assert decoded.dtype == torch.bfloat16
    relative = (decoded.float() - expected).abs().max() / expected.abs().max()
    assert relative < 0.05


def sd_first_stage_config(name: str = "v1-inference.yaml") -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / name).model.params.first_stage_config, resolve=True)


def test_sd_config_has_the_released_keys_and_shapes():
    first_stage = sd_first_stage_config()
    with torch.device("meta"):
        # through the yaml path, so lossconfig and monitor must be dropped centrally
        model = instantiate_from_config(first_stage)
    assert isinstance(model, AutoencoderKL)
    state_dict = model.state_dict()

    assert sum(parameter.numel() for parameter in model.parameters()) == 83_653_863
    assert len(state_dict) == 248
    released_shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.block_2.norm2.bias": (512,),
        "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in released_shapes.items():
        assert tuple(state_dict[key].shape) == shape, key
    assert "decoder.up.0.upsample.conv.weight" not in state_dict
    assert "encoder.down.3.downsample.conv.weight" not in state_dict
    assert not any(".temb_proj." in key or ".attn.0." in key for key in state_dict)
    # three blocks of norm1, conv1, norm2, conv2 (weight and bias each) and one 512 -> 256 nin_shortcut
    assert sum(key.startswith("decoder.up.1.block.") for key in state_dict) == 3 * 8 + 2

    # diffusers' converter must place every one of our weights, and fill every diffusers weight at its shape
    ddconfig = first_stage["params"]["ddconfig"]
    config, converted = convert_to_diffusers(state_dict, ddconfig)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**config)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in converted.items()} == expected


def test_sd2_config_builds_the_same_layout():
    with torch.device("meta"):
        v1 = instantiate_from_config(sd_first_stage_config("v1-inference.yaml"))
        v2 = instantiate_from_config(sd_first_stage_config("v2-inference-v.yaml"))
    assert {k: v.shape for k, v in v1.state_dict().items()} == {k: v.shape for k, v in v2.state_dict().items()}


def test_real_size_decode_of_a_small_latent():
    params = sd_first_stage_config()["params"]
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=params["ddconfig"], embed_dim=params["embed_dim"]).eval()
    # seeded fan-in-scaled weights instead of the layers' default init, which would draw from the global RNG
    model.to_empty(device="cpu")
    randomize_(model, seed=4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        image = model.decode(latents)
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()
    assert image.std() > 0


@pytest.mark.parametrize("attn_type", ["linear", "none", "memory-efficient-cross-attn"])
def test_unsupported_attention_is_rejected(attn_type):
    with pytest.raises(ValueError, match=attn_type):
        Encoder(**TINY_DDCONFIG, attn_type=attn_type)
    with pytest.raises(ValueError, match="use_linear_attn"):
        Decoder(**TINY_DDCONFIG, use_linear_attn=True)


def test_xformers_attention_name_is_the_vanilla_block():
    vanilla = AutoencoderKL(ddconfig={**TINY_DDCONFIG, "attn_resolutions": [16]}, embed_dim=4)
    xformers = AutoencoderKL(ddconfig={**TINY_DDCONFIG, "attn_resolutions": [16], "attn_type": "vanilla-xformers"},
                             embed_dim=4)
    shapes = {key: value.shape for key, value in vanilla.state_dict().items()}
    assert shapes == {key: value.shape for key, value in xformers.state_dict().items()}
    assert "encoder.down.1.attn.0.q.weight" in shapes and "decoder.up.1.attn.1.proj_out.bias" in shapes


def test_single_z_is_rejected():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(ddconfig={**TINY_DDCONFIG, "double_z": False}, embed_dim=4)


# -- the posterior ---------------------------------------------------------------------------------------------

def hand_made_parameters(mean: float, logvar: float, shape=(2, 3, 4, 5)) -> torch.Tensor:
    return torch.cat([torch.full(shape, mean), torch.full(shape, logvar)], dim=1)


def test_posterior_known_answers():
    posterior = DiagonalGaussianDistribution(hand_made_parameters(mean=1.5, logvar=math.log(4.0)))
    elements = 3 * 4 * 5
    assert torch.equal(posterior.mode(), torch.full((2, 3, 4, 5), 1.5))
    assert torch.allclose(posterior.std, torch.full((2, 3, 4, 5), 2.0))
    assert torch.allclose(posterior.var, torch.full((2, 3, 4, 5), 4.0))
    # KL(N(1.5, 4) || N(0, 1)) = 0.5 * (1.5**2 + 4 - 1 - ln 4) per element
    expected_kl = 0.5 * (2.25 + 4.0 - 1.0 - math.log(4.0)) * elements
    assert torch.allclose(posterior.kl(), torch.full((2,), expected_kl))
    assert torch.allclose(posterior.kl(posterior), torch.zeros(2), atol=1e-5)
    # -log N(x; 1.5, 4) at x = 1.5 + 2 (one std away) = 0.5 * (ln 2pi + ln 4 + 1) per element
    expected_nll = 0.5 * (math.log(2 * math.pi) + math.log(4.0) + 1.0) * elements
    assert torch.allclose(posterior.nll(torch.full((2, 3, 4, 5), 3.5)), torch.full((2,), expected_nll))

    other = DiagonalGaussianDistribution(hand_made_parameters(mean=0.5, logvar=0.0))
    # KL(N(1.5, 4) || N(0.5, 1)) = 0.5 * (1 + 4 - 1 - ln 4) per element
    assert torch.allclose(posterior.kl(other), torch.full((2,), 0.5 * (4.0 - math.log(4.0)) * elements))


def test_posterior_clamps_logvar_and_supports_deterministic():
    wide = DiagonalGaussianDistribution(hand_made_parameters(mean=0.0, logvar=50.0))
    narrow = DiagonalGaussianDistribution(hand_made_parameters(mean=0.0, logvar=-50.0))
    assert torch.all(wide.logvar == 20.0) and torch.all(narrow.logvar == -30.0)
    assert torch.isfinite(wide.var).all() and torch.all(narrow.var > 0)

    deterministic = DiagonalGaussianDistribution(hand_made_parameters(mean=0.7, logvar=1.0), deterministic=True)
    assert torch.equal(deterministic.sample(torch.Generator().manual_seed(0)), deterministic.mean)
    assert deterministic.kl().abs().sum() == 0 and deterministic.nll(deterministic.mean).abs().sum() == 0

    with pytest.raises(ValueError, match="even number"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))


def available_devices() -> list[str]:
    devices = ["cpu"]
    accelerator = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accelerator is not None:
        devices.append(accelerator.type)
    return devices


@pytest.mark.parametrize("device", available_devices())
def test_posterior_sample_is_reproducible_and_device_independent(device):
    parameters = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    posterior_cpu = DiagonalGaussianDistribution(parameters)
    posterior = DiagonalGaussianDistribution(parameters.to(device))

    first = posterior.sample(torch.Generator().manual_seed(11))
    second = posterior.sample(torch.Generator().manual_seed(11))
    other_seed = posterior.sample(torch.Generator().manual_seed(12))
    assert first.device.type == device
    assert torch.equal(first, second)
    assert not torch.allclose(first, other_seed)

    # the noise is exactly a CPU float32 draw from the generator, whatever the parameters' device
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(posterior_cpu.sample(torch.Generator().manual_seed(11)),
                          posterior_cpu.mean + posterior_cpu.std * noise)
    assert torch.allclose(first.cpu(), posterior_cpu.mean + posterior_cpu.std * noise, atol=1e-5)

    # a half-precision posterior scales the same noise
    half = DiagonalGaussianDistribution(parameters.to(device, torch.bfloat16))
    half_sample = half.sample(torch.Generator().manual_seed(11))
    assert half_sample.dtype == torch.bfloat16
    assert torch.allclose(half_sample.float().cpu(), first.cpu(), rtol=0.05, atol=0.05)


def test_posterior_sample_rejects_a_non_cpu_generator():
    posterior = DiagonalGaussianDistribution(torch.zeros(1, 8, 2, 2))
    # without an accelerator there is no non-CPU generator to build; the check is exercised where one exists
    devices = [device for device in available_devices() if device != "cpu"]
    if not devices:
        pytest.skip("no accelerator to build a non-CPU torch.Generator on")
    generator = torch.Generator(device=devices[0])
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        posterior.sample(generator)


def test_identity_first_stage():
    x = torch.randn(1, 3, 4, 4)
    stage = IdentityFirstStage()
    assert stage.encode(x) is x and stage.decode(x) is x and stage(x) is x and stage.quantize(x) is x
    quant, loss, info = IdentityFirstStage(vq_interface=True).quantize(x)
    assert quant is x and loss is None and info == [None, None, None]
