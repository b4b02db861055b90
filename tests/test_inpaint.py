"""Inpainting: the library path against diffusers' StableDiffusionInpaintPipeline on the same tiny weights, image,
mask and seeds (a 9-channel inpainting model, and a 4-channel model by latent blending); the mask convention; the
loader's inpainting families and configs; the CLI end to end and its refusals.

diffusers encodes the one init/masked image with the first generator only and repeats the result over a batch,
while each of our images draws from its own seed's stream; with one generator per call the two coincide, so the
reference runs once per seed. Euler is compared with timestep_spacing="linspace", where diffusers' starting noise
scale is sigma_max, as ours.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionInpaintPipeline
from PIL import Image

from checkpoint_factory import TEST_CONFIGS, make_tiny_checkpoint
from image_files import pixels
from ldm.checkpoints import read_shapes
from ldm.pipeline.decoding import to_uint8
from ldm.pipeline.addons.init_image import encode_image as encode_init_image
from ldm.pipeline.images import image_to_tensor
from ldm.cli.inpaint import main
from ldm.pipeline.images import mask_to_tensor
from ldm.loading import CONFIG_DIR, LoadError, detect_family, load_config, load_model, parameters_on_meta, resolve_config
from ldm.models.diffusion.inpainting import (InpaintingInputs, is_inpainting_model, latent_mask, masked_image,
                                             sample_inpaint)
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import encoded_latents
from ldm.util import instantiate_from_config
from reference_sd import NEGATIVE, PROMPT, SCALE, SCHEDULE, diffusers_pipeline
from smooth_inputs import smooth_image

STEPS, SEEDS, SIZE = 10, [5, 6], 64
CONFIG_NAMES = {"v1": "tiny-v1.yaml", "v1-inpainting": "tiny-v1-inpainting.yaml"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoint) -> dict:
    folder = tmp_path_factory.mktemp("inpainting")
    return {"v1": tiny_checkpoint, "v1-inpainting": make_tiny_checkpoint(folder / "tiny-v1-inpainting.ckpt",
                                                                         "v1-inpainting", seed=1)}


@pytest.fixture(scope="module")
def models(checkpoints) -> dict:
    return {family: load_model(path, TEST_CONFIGS / CONFIG_NAMES[family]) for family, path in checkpoints.items()}


def rectangle_mask(width: int = SIZE, height: int = SIZE) -> Image.Image:
    """White (repaint) on a rectangle of the left half, black (keep) elsewhere; edges on the 8-pixel latent grid."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 8: 5 * width // 8] = 255
    return Image.fromarray(mask)


def our_latents(model, sampler: str, strength: float, image: Image.Image, mask_image: Image.Image):
    """(latents, latent mask, init latents of the first draw) the library makes for SEEDS."""
    image_tensor = image_to_tensor(image, SIZE, SIZE)
    mask = mask_to_tensor(mask_image, SIZE, SIZE)
    inputs = InpaintingInputs(
        image_posterior=encode_init_image(model, image_tensor), mask=latent_mask(mask, SIZE // 8, SIZE // 8),
        masked_image_posterior=encode_init_image(model, masked_image(image_tensor, mask))
        if is_inpainting_model(model) else None)
    cond = model.get_learned_conditioning([PROMPT] * len(SEEDS))
    uncond = model.get_learned_conditioning([NEGATIVE] * len(SEEDS))
    latents = sample_inpaint(model, sampler, STEPS, inputs, strength, cond, uncond, SCALE, ImageNoise(SEEDS),
                             disable=True)
    return latents, inputs.mask, encoded_latents(model, inputs.image_posterior, ImageNoise(SEEDS))


# --- (a) the library path equals diffusers' inpainting pipeline ----------------------------------------------------
@pytest.mark.parametrize("family, sampler, strength", [
    ("v1-inpainting", "ddim", 1.0), ("v1-inpainting", "euler", 1.0), ("v1", "ddim", 1.0), ("v1", "euler", 0.75),
], ids=["inpainting-model-ddim", "inpainting-model-euler", "blending-ddim", "blending-euler-strength-0.75"])
@torch.no_grad()
def test_same_images_as_diffusers_inpaint_pipeline(models, checkpoints, tmp_path, family, sampler, strength):
    model, image, mask_image = models[family], smooth_image(SIZE, SIZE), rectangle_mask()
    latents, mask, init = our_latents(model, sampler, strength, image, mask_image)
    ours = ((model.decode_first_stage(latents) + 1) / 2).clamp(0, 1)
    scheduler = (DDIMScheduler(clip_sample=False, timestep_spacing="leading", **SCHEDULE) if sampler == "ddim" else
                 EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        timestep_spacing="linspace", steps_offset=1))
    components = diffusers_pipeline(checkpoints[family], tmp_path, scheduler, CONFIG_NAMES[family]).components
    pipe = StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == (9 if family == "v1-inpainting" else 4)
    reference = torch.cat([pipe(PROMPT, image=image, mask_image=mask_image, strength=strength, height=SIZE,
                                width=SIZE, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                                output_type="pt", generator=torch.Generator().manual_seed(seed)).images
                           for seed in SEEDS])
    assert ours.shape == reference.shape == (2, 3, SIZE, SIZE)
    assert (reference[0] - reference[1]).abs().max() > 0.01  # each image has its own seed
    torch.testing.assert_close(ours, reference, atol=5e-5, rtol=0)
    if family == "v1":  # blending keeps the init latents exactly where the mask is black
        keep = mask.expand_as(latents) == 0
        assert torch.equal(latents[keep], init[keep])
        assert (latents - init)[~keep].abs().min() > 0


@torch.no_grad()
def test_mask_white_is_repainted_and_black_kept(models):
    """Binarised at 0.5 (grey 128 repaints, 127 keeps); the masked image is grey (0) where the mask is white."""
    levels = Image.fromarray(np.array([[0, 127, 128, 255]] * 4, np.uint8))
    assert mask_to_tensor(levels, 4, 4)[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    image = torch.full((1, 3, 4, 4), 0.5)
    assert masked_image(image, mask_to_tensor(levels, 4, 4))[0, 0, 0].tolist() == [0.5, 0.5, 0.0, 0.0]
    # an all-black mask keeps every latent (blending), an all-white one keeps none
    black, white = Image.new("L", (SIZE, SIZE), 0), Image.new("L", (SIZE, SIZE), 255)
    kept, _, init = our_latents(models["v1"], "euler", 1.0, smooth_image(SIZE, SIZE), black)
    assert torch.equal(kept, init)
    repainted, _, init = our_latents(models["v1"], "euler", 1.0, smooth_image(SIZE, SIZE), white)
    assert (repainted - init).abs().min() > 0


# --- (b) the loader ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["v1-inpainting", "v2-inpainting"])
def test_released_inpainting_configs_build_the_released_layout(family):
    config = load_config(CONFIG_DIR / f"{family}-inference.yaml")
    with parameters_on_meta():
        model = instantiate_from_config(config.model)
    assert type(model).__name__ == "LatentInpaintDiffusion" and model.model.conditioning_key == "hybrid"
    assert model.concat_keys == ("mask", "masked_image")
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 9, 3, 3)
    assert shapes["model.diffusion_model.out.2.weight"] == (4, 320, 3, 3)
    assert detect_family(shapes) == family


def test_loader_detects_inpainting_checkpoints(checkpoints, tiny_checkpoints):
    shapes = read_shapes(checkpoints["v1-inpainting"])
    assert detect_family(shapes) == "v1-inpainting"
    assert resolve_config(checkpoints["v1-inpainting"]) == CONFIG_DIR / "v1-inpainting-inference.yaml"
    v2 = dict(read_shapes(tiny_checkpoints["v2", ".safetensors"]))
    v2["model.diffusion_model.input_blocks.0.0.weight"] = (32, 9, 3, 3)
    assert detect_family(v2) == "v2-inpainting"
    with pytest.raises(LoadError, match="this is an SD 1.x inpainting checkpoint: use configs/stable-diffusion/"
                                        "v1-inpainting-inference.yaml"):
        load_model(checkpoints["v1-inpainting"], TEST_CONFIGS / "tiny-v1.yaml")
    depth = dict(shapes, **{"model.diffusion_model.input_blocks.0.0.weight": (32, 5, 3, 3)})
    with pytest.raises(LoadError, match="takes 5 input channels .* use a text-to-image .* or inpainting"):
        detect_family(depth)


# --- (c) the CLI end to end -----------------------------------------------------------------------------------------
@pytest.fixture
def cli(checkpoints, tmp_path, capsys):
    """cli(family, *flags) -> (exit status, stdout, stderr), 4 steps, one image unless flags say otherwise."""
    def run(family, *flags):
        base = ["--ckpt", str(checkpoints[family]), "--config", str(TEST_CONFIGS / CONFIG_NAMES[family]),
                "--ddim_steps", "4", "--precision", "full", "--n_samples", "1"]
        status = main(base + [str(flag) for flag in flags])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run


@pytest.fixture
def files(tmp_path) -> dict:
    paths = {"init": tmp_path / "photo.png", "mask": tmp_path / "mask.png", "big_mask": tmp_path / "big-mask.png"}
    smooth_image(SIZE, SIZE).save(paths["init"])
    rectangle_mask().save(paths["mask"])
    rectangle_mask(2 * SIZE, 2 * SIZE).save(paths["big_mask"])
    return paths


@pytest.mark.parametrize("family", ["v1-inpainting", "v1"])
@torch.no_grad()
def test_cli_writes_the_library_images_with_init_image_and_mask_hashes(cli, models, files, tmp_path, family):
    out = tmp_path / "out"
    status, stdout, err = cli(family, "--init-img", files["init"], "--mask", files["big_mask"], "--outdir", out,
                              "--seed", 42, "--n_samples", 2, "--sampler", "euler")
    assert status == 0, err
    assert "the mask is 128x128, the init image 64x64: both are resized to 64x64" in err  # as diffusers resizes
    samples = out / "samples"
    assert sorted(path.name for path in samples.glob("*.png")) == ["00000.png", "00001.png"]
    with Image.open(samples / "00001.png") as saved:
        parameters = saved.info["parameters"]
    digest = {name: hashlib.sha256(files[name].read_bytes()).hexdigest()[:10] for name in ("init", "big_mask")}
    assert "Sampler: Euler, CFG scale: 5, Seed: 43, Size: 64x64" in parameters
    assert parameters.endswith(f"Denoising strength: 1.0, Init image: photo.png, Init image hash: {digest['init']}, "
                               f"Mask: big-mask.png, Mask hash: {digest['big_mask']}, Version: latent-diffusion")
    sidecar = yaml.safe_load((samples / "00001.yaml").read_text(encoding="utf-8"))
    assert (sidecar["mask"], sidecar["mask_hash"], sidecar["init_image_hash"]) == (
        str(files["big_mask"]), digest["big_mask"], digest["init"])

    model = models[family]
    image = image_to_tensor(Image.open(files["init"]).convert("RGB"), SIZE, SIZE)
    mask = mask_to_tensor(Image.open(files["big_mask"]), SIZE, SIZE)
    inputs = InpaintingInputs(encode_init_image(model, image), latent_mask(mask, 8, 8),
                              encode_init_image(model, masked_image(image, mask)) if family != "v1" else None)
    cond = model.get_learned_conditioning(["a painting of a virus monster playing guitar"] * 2)
    latents = sample_inpaint(model, "euler", 4, inputs, 1.0, cond, model.get_learned_conditioning([""] * 2), 5.0,
                             ImageNoise([42, 43]), disable=True)
    expected = to_uint8(model.decode_first_stage(latents))
    for index in range(2):
        assert np.abs(pixels(samples / f"0000{index}.png").astype(int) - expected[index]).max() <= 1

    status, _, err = cli(family, "--metadata_from", samples / "00001.yaml", "--outdir", tmp_path / "again")
    assert status == 0, err
    assert np.array_equal(pixels(samples / "00001.png"), pixels(tmp_path / "again" / "samples" / "00000.png"))


def test_inpainting_models_take_every_sampler_at_strength_1(cli, files, tmp_path):
    status, _, err = cli("v1-inpainting", "--init-img", files["init"], "--mask", files["mask"], "--plms", "--outdir",
                         tmp_path / "out", "--skip_grid")
    assert status == 0, err
    assert (tmp_path / "out" / "samples" / "00000.png").exists()


def test_txt2img_and_img2img_refuse_inpainting_checkpoints(checkpoints, files, tmp_path, capsys):
    from ldm.cli import img2img, txt2img

    for script, flags in ((txt2img, []), (img2img, ["--init-img", str(files["init"])])):
        status = script.main(["--ckpt", str(checkpoints["v1-inpainting"]), "--outdir", str(tmp_path / "out"),
                              *flags])
        err = capsys.readouterr().err
        assert status == 2 and err.count("error") == 1 and "is an inpainting model" in err
        assert "use scripts/inpaint.py --init-img IMAGE --mask MASK" in err
    assert not (tmp_path / "out").exists()


# --- (d) bad input: one line, exit status 2, nothing written --------------------------------------------------------
@pytest.mark.parametrize("family, flags, message", [
    ("v1", ("--init-img", "{init}"), "--mask is required: pass the mask (white: repaint, black: keep)"),
    ("v1", ("--init-img", "{init}", "--mask", "{tmp}/missing.png"), "--mask {tmp}/missing.png not found"),
    ("v1", ("--init-img", "{init}", "--mask", "{tmp}/text.png"), "is not an image PIL can read"),
    ("v1", ("--mask", "{mask}"), "--init-img is required"),
    ("v1", ("--init-img", "{init}", "--mask", "{mask}", "--plms"), "inpainting cannot use the plms sampler with a "
                                                                   "text-to-image checkpoint"),
    ("v1-inpainting", ("--init-img", "{init}", "--mask", "{mask}", "--strength", "0.5", "--sampler", "dpm_solver"),
     "inpainting cannot use the dpm_solver sampler"),
    ("v1", ("--init-img", "{init}", "--mask", "{mask}", "--strength", "2"), "--strength 2.0 is outside [0, 1]"),
], ids=["no-mask", "mask-missing", "mask-not-an-image", "no-init-image", "plms-blending", "dpm-solver-strength",
        "strength"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, files, tmp_path, family, flags, message):
    (tmp_path / "text.png").write_text("not a picture")
    paths = {"init": files["init"], "mask": files["mask"], "tmp": tmp_path}
    outdir = tmp_path / "out"
    status, out, err = cli(family, *(flag.format(**paths) for flag in flags), "--outdir", outdir)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("inpaint.py: error: ") and message.format(**paths) in err, err
    assert "Loading model" not in out
    assert not outdir.exists()


def test_each_script_sends_metadata_of_another_scripts_image_to_that_script(tmp_path, capsys):
    """An inpainted image's sidecar run through img2img or txt2img (which would silently drop the mask) is refused
    in one line naming scripts/inpaint.py, and an img2img sidecar given to txt2img names img2img.py."""
    from ldm.cli.img2img import main as img2img_main
    from ldm.cli.txt2img import main as txt2img_main

    inpainted, img2img_made = tmp_path / "inpainted.yaml", tmp_path / "img2img.yaml"
    common = "prompt: a cat\nnegative_prompt: ''\nsteps: 4\nsampler: ddim\nscale: 5.0\nseed: 1\nH: 64\nW: 64\n"
    inpainted.write_text(common + "strength: 1.0\ninit_image: x.png\nmask: m.png\n")
    img2img_made.write_text(common + "strength: 0.5\ninit_image: x.png\n")
    for main, sidecar, script in ((img2img_main, inpainted, "inpaint.py"), (txt2img_main, inpainted, "inpaint.py"),
                                  (txt2img_main, img2img_made, "img2img.py")):
        assert main(["--metadata_from", str(sidecar), "--outdir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"was made by {script}: make it again with scripts/{script} --metadata_from {sidecar}" in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
