"""SDXL (base, refiner) through the `sgm` layer: the conditioning and the images of diffusers' StableDiffusionXL
pipelines on the same weights and starting noise, the released generative-models configs, the loader and the CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.loaders import single_file_utils
from omegaconf import OmegaConf

from checkpoint_factory import TEST_CONFIGS, write_checkpoint
from ldm.checkpoints import read_checkpoint, read_shapes
from ldm.cli.plan import fill_model_defaults
from ldm.loading import (CONFIG_DIR, LoadError, detect_family, load_config, load_model, parameters_on_meta,
                         resolve_config)
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import sample
from ldm.util import instantiate_from_config
from sgm.models.diffusion import DiffusionEngine
from reference_sdxl import PROMPTS, SCALE, SCHEDULE, diffusers_parts, diffusers_vector

SIZE = 64  # pixels; latents 8 x 8
STEPS = 4  # 4 steps: 999 / (4 - 1) is whole, so Euler's sigmas sit on trained timesteps


@pytest.fixture(scope="module")
def checkpoints(tiny_xl_checkpoints) -> dict[str, Path]:
    return tiny_xl_checkpoints


@pytest.fixture(scope="module")
def models(checkpoints) -> dict[str, DiffusionEngine]:
    return {family: load_model(path, TEST_CONFIGS / f"tiny-{family}.yaml") for family, path in checkpoints.items()}


@pytest.fixture(scope="module")
def vocabulary(hf_vocabulary) -> Path:
    return hf_vocabulary


# --- (a) conditioning ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_base_conditioning_matches_diffusers_encode_prompt(checkpoints, models, vocabulary):
    model = models["xl"]
    parts = diffusers_parts(checkpoints["xl"], "xl", vocabulary)
    pipe = StableDiffusionXLPipeline(**parts, scheduler=DDIMScheduler(**SCHEDULE), force_zeros_for_empty_prompt=True)
    original, target = (96, 64), (64, 128)  # height first, as both order them
    size = dict(original_size=original, crop_coords_top_left=(8, 16), target_size=target)
    time_ids = pipe._get_add_time_ids(original, (8, 16), target, torch.float32, text_encoder_projection_dim=16)
    time_ids = time_ids.repeat(2, 1)
    for negative in (None, "blurry, low quality"):
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=True,
            negative_prompt=None if negative is None else [negative] * 2)
        cond = model.get_learned_conditioning(PROMPTS, **size)
        uncond = model.get_unconditional_conditioning(["" if negative is None else negative] * 2, **size)
        assert cond["crossattn"].shape == (2, 77, 64) and cond["vector"].shape == (2, 64)
        torch.testing.assert_close(cond["crossattn"], embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(cond["vector"], diffusers_vector(pipe.unet, pooled, time_ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(uncond["crossattn"], negative_embeds, atol=1e-5, rtol=0)
        torch.testing.assert_close(uncond["vector"], diffusers_vector(pipe.unet, negative_pooled, time_ids),
                                   atol=1e-5, rtol=0)
    assert negative_embeds.abs().sum() > 0 and uncond["vector"][:, :16].abs().sum() > 0

    # defaults: original = target = (1024, 1024), crop (0, 0); a batch mixing empty and given negatives
    defaults = model.get_learned_conditioning(PROMPTS[:1])["vector"]
    explicit = model.get_learned_conditioning(PROMPTS[:1], original_size=(1024, 1024), target_size=(1024, 1024),
                                              crop_coords_top_left=(0, 0))["vector"]
    assert torch.equal(defaults, explicit)
    mixed = model.get_unconditional_conditioning(["", "blurry"], target_size=(64, 64))
    assert mixed["crossattn"][0].abs().max() == 0 and mixed["vector"][0, :16].abs().max() == 0
    alone = model.get_unconditional_conditioning(["blurry"], target_size=(64, 64))
    torch.testing.assert_close(mixed["crossattn"][1:], alone["crossattn"], atol=0, rtol=0)


@torch.no_grad()
def test_refiner_conditioning_matches_diffusers_with_aesthetic_scores(checkpoints, models, vocabulary):
    model = models["xl-refiner"]
    assert not model.force_zeros_for_empty_prompt  # both sgm and diffusers encode the refiner's empty prompt
    parts = diffusers_parts(checkpoints["xl-refiner"], "xl-refiner", vocabulary)
    pipe = StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                            scheduler=DDIMScheduler(**SCHEDULE), requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt=None)
    time_ids, negative_time_ids = pipe._get_add_time_ids(
        (SIZE, SIZE), (0, 0), (SIZE, SIZE), 6.0, 2.5, (SIZE, SIZE), (0, 0), (SIZE, SIZE), torch.float32,
        text_encoder_projection_dim=16)
    cond = model.get_learned_conditioning(PROMPTS, target_size=(SIZE, SIZE))
    uncond = model.get_unconditional_conditioning(["", ""], target_size=(SIZE, SIZE))
    torch.testing.assert_close(cond["crossattn"], embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(uncond["crossattn"], negative_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["vector"], diffusers_vector(pipe.unet, pooled, time_ids.repeat(2, 1)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(uncond["vector"],
                               diffusers_vector(pipe.unet, negative_pooled, negative_time_ids.repeat(2, 1)),
                               atol=1e-5, rtol=0)
    assert not torch.equal(cond["vector"][:, -8:], uncond["vector"][:, -8:])  # scores 6.0 and 2.5 differ


# --- (b) whole pipeline ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, scheduler, negative", [
    ("ddim", DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                           **SCHEDULE), "blurry"),
    ("euler", EulerDiscreteScheduler(timestep_spacing="linspace", **SCHEDULE), None),
], ids=["ddim-negative", "euler-empty-negative"])
@torch.no_grad()
def test_same_image_as_diffusers_sdxl_pipeline(checkpoints, models, vocabulary, sampler, scheduler, negative):
    model = models["xl"]
    x_T = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))
    size = dict(original_size=(SIZE, SIZE), target_size=(SIZE, SIZE))
    cond = model.get_learned_conditioning(PROMPTS, **size)
    uncond = model.get_unconditional_conditioning([negative or ""] * 2, **size)
    latents = sample(model, sampler, STEPS, x_T.shape, cond, uncond, SCALE, ImageNoise([1, 2]), x_T=x_T.clone(),
                     disable=True)
    ours = ((model.decode_first_stage(latents) + 1) / 2).clamp(0, 1)

    pipe = StableDiffusionXLPipeline(**diffusers_parts(checkpoints["xl"], "xl", vocabulary), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPTS, negative_prompt=None if negative is None else [negative] * 2, height=SIZE, width=SIZE,
                     num_inference_steps=STEPS, guidance_scale=SCALE, latents=x_T.clone(), output_type="pt").images
    assert ours.shape == reference.shape == (2, 3, SIZE, SIZE)
    assert reference.std() > 0.01  # a real image, not a constant
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


# --- (c) the released configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["xl-base", "xl-refiner"])
def test_released_generative_models_configs_build_the_released_layout(family):
    """configs/stable-diffusion/sd_xl_*.yaml (generative-models' files) at full size on the meta device: the UNet,
    autoencoder and text encoders have exactly the keys and shapes diffusers' converters expect of such a file."""
    config = load_config(CONFIG_DIR / ("sd_xl_base.yaml" if family == "xl-base" else "sd_xl_refiner.yaml"))
    with parameters_on_meta():
        model = instantiate_from_config(config.model)
    assert isinstance(model, DiffusionEngine) and model.parameterization == "eps" and model.scale_factor == 0.13025
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert detect_family(shapes) == family
    checkpoint = {key: value for key, value in model.state_dict().items() if value.is_meta}
    original = OmegaConf.to_container(config)
    unet_config = single_file_utils.create_unet_diffusers_config_from_ldm(original, checkpoint)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in
                                                                  unet.state_dict().items()}
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == ((1280, 2816) if family == "xl-base"
                                                                    else (1536, 2560))
    big_g = "conditioner.embedders.1.model." if family == "xl-base" else "conditioner.embedders.0.model."
    assert shapes[big_g + "text_projection"] == (1280, 1280)
    assert shapes[big_g + "positional_embedding"] == (77, 1280)
    assert sum(key.startswith(big_g + "transformer.resblocks.") and key.endswith("ln_1.weight") for key in shapes) == 32
    if family == "xl-base":
        assert shapes["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] == (768,)
        assert shapes["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    vae_config = single_file_utils.create_vae_diffusers_config_from_ldm(original, checkpoint)
    assert vae_config["scaling_factor"] == 0.13025
    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config)
    assert set(single_file_utils.convert_ldm_vae_checkpoint(checkpoint, vae_config)) == set(vae.state_dict())
    # the schedule is SD's: scaled linear 0.00085 .. 0.012 over 1000 steps, as diffusers' SDXL scheduler
    reference = DDIMScheduler(**SCHEDULE).alphas_cumprod
    torch.testing.assert_close(model.alphas_cumprod, reference, atol=1e-6, rtol=0)
    assert model.denoiser.sigmas.shape == (1000,)


@torch.no_grad()
def test_sgm_denoiser_equals_the_samplers_denoiser(models):
    """sgm's own D(x, sigma) (DiscreteDenoiser + EpsScaling around the wrapped UNet) is the k-diffusion denoiser our
    samplers build from the CompVis schedule buffers: the two schedules and scalings agree. sgm quantizes its
    timesteps (quantize_c_noise), so the comparison takes ours quantized too (k-diffusion's default is not)."""
    from ldm.models.diffusion.k_denoisers import make_denoiser

    model = models["xl"]
    ours = make_denoiser(model, quantize=True)
    torch.testing.assert_close(model.denoiser.sigmas, ours.sigmas, atol=1e-6, rtol=1e-6)
    sigma = model.denoiser.sigmas[torch.tensor([999, 400, 3])]
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigma[:, None, None, None]
    cond = model.get_learned_conditioning(["a", "b", "c"], target_size=(SIZE, SIZE))
    torch.testing.assert_close(model.denoiser(model.model, x, sigma, cond), ours(x, sigma, cond=cond),
                               atol=1e-5, rtol=1e-5)


def test_sgm_sampler_free_config_keys_are_accepted():
    """Training keys of generative-models configs are dropped; sampler_config is kept unbuilt."""
    config = OmegaConf.load(str(TEST_CONFIGS / "tiny-xl.yaml"))
    config.model.params.update(sampler_config={"target": "sgm.modules.diffusionmodules.sampling.EulerEDMSampler"},
                               loss_fn_config={"target": "sgm.modules.diffusionmodules.loss.StandardDiffusionLoss"},
                               optimizer_config={"target": "torch.optim.AdamW"}, input_key="jpg", use_ema=False,
                               compile_model=False, en_and_decode_n_samples_a_time=1, log_keys=["txt"])
    with parameters_on_meta():
        model = instantiate_from_config(config.model)
    assert model.sampler_config["target"].endswith("EulerEDMSampler")
    bad = OmegaConf.load(str(TEST_CONFIGS / "tiny-xl.yaml"))
    bad.model.params.denoiser_config.params.scaling_config.target = \
        "sgm.modules.diffusionmodules.denoiser_scaling.EDMScaling"
    with pytest.raises(ValueError, match="EDMScaling has no discrete-time equivalent"):
        instantiate_from_config(bad.model)


# --- (d) loader ------------------------------------------------------------------------------------------------------
def test_loader_detects_base_and_refiner_and_explains_mismatches(checkpoints, tmp_path):
    assert detect_family(read_shapes(checkpoints["xl"])) == "xl-base"
    assert detect_family(read_shapes(checkpoints["xl-refiner"])) == "xl-refiner"
    assert resolve_config(checkpoints["xl"]) == CONFIG_DIR / "sd_xl_base.yaml"
    assert resolve_config(checkpoints["xl-refiner"]) == CONFIG_DIR / "sd_xl_refiner.yaml"
    with pytest.raises(LoadError, match="this is an SDXL refiner checkpoint: use configs/stable-diffusion/"
                                        "sd_xl_refiner.yaml"):
        load_model(checkpoints["xl-refiner"], TEST_CONFIGS / "tiny-xl.yaml")
    with pytest.raises(LoadError, match="this is an SDXL base .*sd_xl_base.yaml"):
        load_model(checkpoints["xl"], TEST_CONFIGS / "tiny-xl-refiner.yaml")
    shapes = read_shapes(checkpoints["xl"])
    odd = {key: shape for key, shape in shapes.items() if not key.startswith("conditioner.embedders.0.")}
    with pytest.raises(LoadError, match="match neither SDXL base .* nor the refiner"):
        detect_family(odd)
    diffusers_layout = {"unet.conv_in.weight": (320, 4, 3, 3),
                        "text_encoder.text_model.final_layer_norm.weight": (768,)}
    with pytest.raises(LoadError, match="diffusers' layout"):
        detect_family(diffusers_layout)
    inpainting = dict(shapes, **{"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3)})
    with pytest.raises(LoadError, match="9 input channels"):
        detect_family(inpainting)


def test_loader_accepts_released_extras_and_takes_ema_weights(checkpoints, models, tmp_path):
    state_dict, _ = read_checkpoint(checkpoints["xl"])
    state_dict = dict(state_dict)
    state_dict["denoiser.sigmas"] = torch.ones(1000)  # carried by some SDXL files; recomputed, never loaded
    state_dict["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ema = {"model_ema." + key[len("model."):].replace(".", ""): value + 1.0
           for key, value in state_dict.items() if key.startswith("model.diffusion_model.")}
    path = write_checkpoint({**state_dict, **ema}, tmp_path / "with-ema.ckpt")
    plain = load_model(path, TEST_CONFIGS / "tiny-xl.yaml")
    assert torch.equal(plain.model.diffusion_model.out[2].weight, models["xl"].model.diffusion_model.out[2].weight)
    torch.testing.assert_close(plain.denoiser.sigmas, models["xl"].denoiser.sigmas, atol=0, rtol=0)
    with_ema = load_model(path, TEST_CONFIGS / "tiny-xl.yaml", use_ema=True)
    assert torch.equal(with_ema.model.diffusion_model.out[2].weight, plain.model.diffusion_model.out[2].weight + 1)
    assert torch.equal(with_ema.first_stage_model.post_quant_conv.weight,
                       plain.first_stage_model.post_quant_conv.weight)


# --- (e) command line ------------------------------------------------------------------------------------------------
def test_txt2img_writes_sdxl_images_with_size_conditioning(checkpoints, models, tmp_path):
    from PIL import Image

    from ldm.cli.txt2img import main

    outdir = tmp_path / "out"
    status = main(["--ckpt", str(checkpoints["xl"]), "--config", str(TEST_CONFIGS / "tiny-xl.yaml"), "--prompt",
                   PROMPTS[0], "--H", str(SIZE), "--W", "96", "--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1",
                   "--seed", "5", "--sampler", "euler", "--scale", str(SCALE), "--outdir", str(outdir), "--skip_grid",
                   "--no_metadata"])
    assert status == 0
    saved = sorted((outdir / "samples").glob("*.png"))
    assert len(saved) == 1
    pixels = torch.tensor(np.array(Image.open(saved[0]).convert("RGB")), dtype=torch.float32)
    assert pixels.shape == (SIZE, 96, 3)

    # the same image from the library, conditioned on the size the flags asked for (height, width)
    model, size = models["xl"], dict(original_size=(SIZE, 96), target_size=(SIZE, 96))
    with torch.no_grad():
        latents = sample(model, "euler", 3, (1, 4, SIZE // 8, 96 // 8), model.get_learned_conditioning(
            PROMPTS[:1], **size), model.get_unconditional_conditioning([""], **size), SCALE, ImageNoise([5]),
            disable=True)
        image = ((model.decode_first_stage(latents) + 1) / 2).clamp(0, 1)[0]
    expected = (image.permute(1, 2, 0) * 255).round()
    assert (pixels - expected).abs().max() <= 1


def test_sdxl_configs_default_to_1024_pixels_and_turbo_files_to_512():
    class Flags:
        f = C = H = W = None

    for name in ("sd_xl_base.yaml", "sd_xl_refiner.yaml"):
        flags = Flags()
        fill_model_defaults(flags, load_config(CONFIG_DIR / name))
        assert (flags.H, flags.W, flags.f, flags.C) == (1024, 1024, 8, 4)
    turbo = Flags()
    turbo.ckpt = "models/sd_xl_turbo_1.0_fp16.safetensors"  # same config, trained at 512
    fill_model_defaults(turbo, load_config(CONFIG_DIR / "sd_xl_base.yaml"))
    assert (turbo.H, turbo.W) == (512, 512)

