"""The x4 upscaler: the library path against diffusers' StableDiffusionUpscalePipeline on the same tiny weights,
image and seeds; the noise augmentation against its formula; the loader's recognition of the released file; the CLI
end to end and its refusals.

Conventions where the two coincide: the upscaler's schedules (model and low-resolution noise: CompVis "linear"
0.0001..0.02) are diffusers' "scaled_linear" with the same ends; DDIM is CompVis' with timestep_spacing "leading",
steps_offset 1 and set_alpha_to_one False; Euler is k-diffusion's with timestep_spacing "linspace". diffusers draws
the low-resolution noise for a whole batch from its first generator, while each of our images draws its own, so
the reference runs once per seed (one generator per call: the augmentation noise, then the starting latents).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionUpscalePipeline
from diffusers.loaders import single_file_utils
from PIL import Image

from checkpoint_factory import TEST_CONFIGS, make_tiny_checkpoint
from decoder_statistics import exact_statistics
from image_files import pixels
from ldm.checkpoints import read_checkpoint, read_shapes
from ldm.pipeline.decoding import to_uint8
from ldm.pipeline.images import image_to_tensor
from ldm.cli.upscale import main
from ldm.loading import CONFIG_DIR, detect_family, load_config, load_model, parameters_on_meta, resolve_config
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.upscale import sample_upscale
from ldm.optimize.vae import VaeTiling, decode_tiled
from ldm.util import instantiate_from_config
from reference_sd import NEGATIVE, PROMPT, diffusers_unet_and_vae
from reference_text import for_transformers, hf_text_config
from smooth_inputs import smooth_image, smooth_latent

CONFIG = TEST_CONFIGS / "tiny-x4-upscaling.yaml"
STEPS, SCALE, NOISE_LEVEL, SEEDS = 10, 9.0, 100, [5, 6]  # 10 divides 1000: DDIM's and diffusers' timesteps agree
LOW_W, LOW_H = 16, 12
SCHEDULE = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("upscaler") / "tiny-x4-upscaler.ckpt", "x4-upscaling",
                                seed=2)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, CONFIG)


def diffusers_upscaler(checkpoint_path: Path, vocabulary: Path, scheduler) -> StableDiffusionUpscalePipeline:
    """diffusers' upscale pipeline from our checkpoint, converted with diffusers' single-file functions."""
    checkpoint, _ = read_checkpoint(checkpoint_path)
    unet, vae = diffusers_unet_and_vae(checkpoint, CONFIG.name)
    # the penultimate layer of 24 blocks is diffusers' 23-block text encoder (the converter drops block 23)
    text = transformers.CLIPTextModel(hf_text_config(32, 23, 4, "gelu"))
    text.load_state_dict(for_transformers(text, single_file_utils.convert_open_clip_checkpoint(text, checkpoint)),
                         strict=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(vocabulary), pad_token="!", model_max_length=77)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer,
                                          unet=unet, low_res_scheduler=DDPMScheduler(**SCHEDULE),
                                          scheduler=scheduler, max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_latents(model, sampler: str, image, seeds=SEEDS, steps=STEPS, noise_level=NOISE_LEVEL) -> torch.Tensor:
    cond = model.get_learned_conditioning([PROMPT] * len(seeds))
    uncond = model.get_learned_conditioning([NEGATIVE] * len(seeds))
    return sample_upscale(model, sampler, steps, image_to_tensor(image, *image.size), noise_level, cond, uncond,
                          SCALE, ImageNoise(seeds), disable=True)


# --- (a) the library path equals diffusers' upscale pipeline -------------------------------------------------------
@pytest.mark.parametrize("sampler, scheduler", [
    ("ddim", DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                           steps_offset=1, timestep_spacing="leading", **SCHEDULE)),
    ("euler", EulerDiscreteScheduler(prediction_type="v_prediction", timestep_spacing="linspace", steps_offset=1,
                                     **SCHEDULE)),
], ids=["ddim", "euler"])
@torch.no_grad()
def test_same_images_as_diffusers_upscale_pipeline(model, checkpoint, hf_vocabulary, sampler, scheduler):
    image = smooth_image(LOW_W, LOW_H)
    ours = ((model.decode_first_stage(our_latents(model, sampler, image)) + 1) / 2).clamp(0, 1)
    pipe = diffusers_upscaler(checkpoint, hf_vocabulary, scheduler)
    reference = torch.cat([
        pipe(PROMPT, image=image, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
             noise_level=NOISE_LEVEL, output_type="pt", generator=torch.Generator().manual_seed(seed)).images
        for seed in SEEDS])
    assert ours.shape == reference.shape == (2, 3, 4 * LOW_H, 4 * LOW_W)
    assert (reference[0] - reference[1]).abs().max() > 0.01  # each image has its own seed
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


@torch.no_grad()
def test_noise_augmentation_is_the_forward_process_at_the_noise_level(model):
    """sqrt(a_l) x + sqrt(1 - a_l) n with a_l from the yaml's betas written out, and the level as class label."""
    x, noise = torch.rand(2, 3, 4, 6) * 2 - 1, torch.randn(2, 3, 4, 6)
    level = torch.tensor([0, 350])
    augmented, labels = model.low_scale_model(x, level, noise)
    betas = np.linspace(0.0001 ** 0.5, 0.02 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)[[0, 350]]
    signal, spread = (torch.tensor(np.sqrt(a), dtype=torch.float32)[:, None, None, None]
                      for a in (alphas_cumprod, 1 - alphas_cumprod))
    expected = signal * x + spread * noise
    torch.testing.assert_close(augmented, expected, atol=1e-6, rtol=0)
    assert labels.dtype == torch.long and labels.tolist() == [0, 350]
    with pytest.raises(ValueError, match=r"must lie in \[0, 350\]"):
        model.low_scale_model(x, torch.tensor([0, 351]), noise)


@torch.no_grad()
def test_noise_level_changes_the_image_and_seeds_are_per_image(model):
    image = smooth_image(LOW_W, LOW_H)
    low, high = our_latents(model, "euler", image, noise_level=0), our_latents(model, "euler", image)
    assert (low - high).abs().max() > 0.01
    alone = our_latents(model, "euler", image, seeds=[6])
    torch.testing.assert_close(alone[0], high[1], atol=1e-4, rtol=1e-4)  # batch size changes float rounding only


def test_vae_tiling_joins_f4_tiles_without_seams(model):
    """--vae_tiling on the upscaler's f=4 autoencoder (its large outputs are what tiling is for): with the exact
    GroupNorm statistics the tiled decode is the untiled one, so the tile geometry (halo, overlap, 4x) is right."""
    vae = model.first_stage_model
    z = smooth_latent(20, 28)  # 2 x 3 tiles
    with torch.no_grad():
        expected = vae.decode(z)
        tiled = decode_tiled(vae.decoder, vae.post_quant_conv(z), VaeTiling(tile=12, overlap=2),
                             exact_statistics(vae, z))
    assert tiled.shape == expected.shape == (1, 3, 80, 112)
    torch.testing.assert_close(tiled, expected, rtol=1e-4, atol=1e-4)


# --- (b) the loader recognises the released upscaler -------------------------------------------------------------
def test_loader_recognises_the_upscaler_and_builds_the_released_config(checkpoint):
    assert detect_family(read_shapes(checkpoint)) == "x4-upscaler"
    released = CONFIG_DIR / "x4-upscaling.yaml"
    assert resolve_config(checkpoint) == released
    with parameters_on_meta():
        model = instantiate_from_config(load_config(released).model)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert type(model).__name__ == "LatentUpscaleDiffusion" and model.parameterization == "v"
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (256, 7, 3, 3)
    assert shapes["model.diffusion_model.label_emb.weight"] == (1000, 1024)
    assert shapes["low_scale_model.sqrt_alphas_cumprod"] == (1000,)
    assert shapes["first_stage_model.decoder.conv_in.weight"] == (512, 4, 3, 3)  # ch 128 x ch_mult[-1] 4
    assert detect_family(shapes) == "x4-upscaler"
    without_buffers = {key: value for key, value in shapes.items() if not key.startswith("low_scale_model.")}
    assert detect_family(without_buffers) == "x4-upscaler"  # the 7-channel UNet's noise-level embedding suffices


def test_a_file_without_the_augmentation_buffers_loads(checkpoint, tmp_path, model):
    state_dict, _ = read_checkpoint(checkpoint)
    pruned = tmp_path / "pruned.ckpt"
    torch.save({"state_dict": {k: v for k, v in state_dict.items() if not k.startswith("low_scale_model.")}}, pruned)
    loaded = load_model(pruned, CONFIG)
    assert torch.equal(loaded.low_scale_model.sqrt_alphas_cumprod, model.low_scale_model.sqrt_alphas_cumprod)


# --- (c) the CLI end to end ---------------------------------------------------------------------------------------
@pytest.fixture
def cli(checkpoint, capsys):
    """cli(*flags) -> (exit status, stdout, stderr), on the tiny upscaler with 4 steps."""
    def run(*flags, ckpt=checkpoint, config=CONFIG):
        base = ["--ckpt", str(ckpt), "--config", str(config), "--ddim_steps", "4", "--precision", "full"]
        status = main(base + [str(flag) for flag in flags])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run


@torch.no_grad()
def test_cli_writes_4x_images_with_their_init_image_and_noise_level(cli, model, tmp_path):
    init = tmp_path / "low.png"
    smooth_image(LOW_W, LOW_H).save(init)
    status, out, err = cli("--init-img", init, "--prompt", PROMPT, "--noise_level", 30, "--n_samples", 2,
                           "--sampler", "euler_a", "--seed", 42, "--outdir", tmp_path / "out")
    assert status == 0, err
    samples = tmp_path / "out" / "samples"
    assert sorted(path.name for path in samples.glob("*.png")) == ["00000.png", "00001.png"]
    with Image.open(samples / "00001.png") as saved:
        assert saved.size == (4 * LOW_W, 4 * LOW_H)
        parameters = saved.info["parameters"]
    init_hash = hashlib.sha256(init.read_bytes()).hexdigest()[:10]
    assert "CFG scale: 9, Seed: 43, Size: 64x48" in parameters
    assert parameters.endswith(f"Noise level: 30, Init image: low.png, Init image hash: {init_hash}, "
                               "Version: latent-diffusion")
    sidecar = yaml.safe_load((samples / "00001.yaml").read_text(encoding="utf-8"))
    assert (sidecar["noise_level"], sidecar["init_image"], sidecar["init_image_hash"]) == (30, str(init), init_hash)

    # the CLI's images are the library path's
    cond = model.get_learned_conditioning([PROMPT] * 2)
    uncond = model.get_learned_conditioning([""] * 2)
    image = Image.open(init).convert("RGB")
    latents = sample_upscale(model, "euler_a", 4, image_to_tensor(image, LOW_W, LOW_H), 30, cond, uncond, 9.0,
                             ImageNoise([42, 43]), disable=True)
    expected = to_uint8(model.decode_first_stage(latents))
    for index in range(2):
        assert np.abs(pixels(samples / f"0000{index}.png").astype(int) - expected[index]).max() <= 1

    # --metadata_from makes the same image again, from the sidecar or the PNG (with the init image named)
    status, _, err = cli("--metadata_from", samples / "00001.yaml", "--outdir", tmp_path / "again")
    assert status == 0, err
    assert np.array_equal(pixels(samples / "00001.png"), pixels(tmp_path / "again" / "samples" / "00000.png"))
    status, _, err = cli("--metadata_from", samples / "00001.png", "--init-img", init, "--outdir", tmp_path / "png")
    assert status == 0, err
    assert np.array_equal(pixels(samples / "00001.png"), pixels(tmp_path / "png" / "samples" / "00000.png"))


# --- (d) bad input: one line, exit status 2, nothing written ------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    ((), "--init-img is required"),
    (("--init-img", "{tmp}/missing.png"), "missing.png not found"),
    (("--init-img", "{tmp}/odd.png"), "--init-img is 15x12: this model takes sides that are multiples of 2"),
    (("--init-img", "{tmp}/good.png", "--noise_level", "351"), "--noise_level 351 is outside [0, 350]"),
    (("--init-img", "{tmp}/good.png", "--noise_level", "-1"), "--noise_level -1 is outside [0, 350]"),
    (("--init-img", "{tmp}/good.png", "--noise_level", "2.5"), "argument --noise_level: invalid int value"),
    (("--init-img", "{tmp}/good.png", "--W", "128"), "--W sets the output width"),
    (("--init-img", "{tmp}/good.png", "--strength", "0.5"), "unrecognized arguments: --strength"),
    (("--init-img", "{tmp}/good.png", "--ckpt", "{v1}", "--config", "{v1_config}"), "is not the x4 upscaler"),
], ids=["no-image", "missing", "odd-size", "level-high", "level-negative", "level-float", "width", "strength",
        "text-to-image-model"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, tmp_path, tiny_checkpoint, tiny_config, flags,
                                                           message):
    smooth_image(LOW_W, LOW_H).save(tmp_path / "good.png")
    smooth_image(15, 12).save(tmp_path / "odd.png")
    outdir = tmp_path / "out"
    values = dict(tmp=tmp_path, v1=tiny_checkpoint, v1_config=tiny_config)
    status, out, err = cli(*(flag.format(**values) for flag in flags), "--outdir", outdir)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("upscale.py: error: ") and message in err, err
    assert "Loading model" not in out
    assert not Path(outdir).exists()


def test_other_scripts_refuse_the_upscaler_and_name_upscale_py(checkpoint, tmp_path, capsys):
    from ldm.cli import inpaint, txt2img

    smooth_image(LOW_W, LOW_H).save(tmp_path / "good.png")
    for run, extra in ((txt2img.main, []), (inpaint.main, ["--init-img", str(tmp_path / "good.png"), "--mask",
                                                           str(tmp_path / "good.png")])):
        status = run(["--ckpt", str(checkpoint), "--config", str(CONFIG), "--precision", "full", "--outdir",
                      str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and "is the x4 upscaler" in err and "scripts/upscale.py" in err


def test_metadata_from_an_image_made_without_a_prompt(cli, tmp_path):
    """The upscaler's default prompt is empty; its images must still be made again from their sidecars."""
    init = tmp_path / "low.png"
    smooth_image(LOW_W, LOW_H).save(init)
    assert cli("--init-img", init, "--seed", 3, "--outdir", tmp_path / "out")[0] == 0
    sample = tmp_path / "out" / "samples" / "00000"
    assert yaml.safe_load(sample.with_suffix(".yaml").read_text(encoding="utf-8"))["prompt"] == ""
    status, _, err = cli("--metadata_from", sample.with_suffix(".yaml"), "--outdir", tmp_path / "again")
    assert status == 0, err
    assert np.array_equal(pixels(sample.with_suffix(".png")), pixels(tmp_path / "again" / "samples" / "00000.png"))


@torch.no_grad()
def test_a_diffusers_upscaler_folder_makes_the_files_images(checkpoint, model, hf_vocabulary, tmp_path, capsys):
    """stabilityai/stable-diffusion-x4-upscaler's layout (saved by diffusers from the tiny file): recognised as the
    x4 upscaler, v prediction and the noise augmentation from its schedulers, every UNet and autoencoder weight and
    the text conditioning equal to the file's, and upscale.py with --ckpt <folder> makes the file's image."""
    pipe = diffusers_upscaler(checkpoint, hf_vocabulary, DDIMScheduler(prediction_type="v_prediction", **SCHEDULE))
    pipe.save_pretrained(tmp_path / "x4-folder")
    folder = tmp_path / "x4-folder"
    assert resolve_config(folder).name == "x4-upscaling.yaml"
    loaded = load_model(folder)
    assert loaded.parameterization == "v" and loaded.low_scale_model.max_noise_level == 350
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        if key.startswith(("model.", "first_stage_model.", "low_scale_model.")):
            assert torch.equal(value, expected[key]), key
    torch.testing.assert_close(loaded.get_learned_conditioning([PROMPT]), model.get_learned_conditioning([PROMPT]),
                               atol=1e-6, rtol=0)
    init = tmp_path / "low.png"
    smooth_image(LOW_W, LOW_H).save(init)
    made = {}
    runs = {"file": ["--ckpt", str(checkpoint), "--config", str(CONFIG)], "folder": ["--ckpt", str(folder)]}
    for name, flags in runs.items():
        status = main([*flags, "--ddim_steps", "4", "--init-img", str(init), "--prompt", PROMPT, "--n_samples", "1",
                       "--seed", "7", "--outdir", str(tmp_path / name), "--no_metadata"])
        assert status == 0, capsys.readouterr().err
        made[name] = np.asarray(Image.open(tmp_path / name / "samples" / "00000.png"))
    assert np.array_equal(made["file"], made["folder"]) and made["file"].std() > 1
