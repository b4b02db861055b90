"""Models in diffusers' folder layout: saved by diffusers' own `save_pretrained` from pipelines it assembles from our
tiny checkpoints, read back into the released key layout (every weight equal), their scheduler settings honoured,
the same images as diffusers' pipelines loaded from the same folders, the CLI with `--ckpt <folder>`, and the
folders' mistakes refused in one line."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from checkpoint_factory import TEST_CONFIGS, make_tiny_checkpoint, make_tiny_xl_checkpoint, write_checkpoint
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders import single_file_utils
from omegaconf import OmegaConf
from PIL import Image
from reference_sd import NEGATIVE, PROMPT, SCHEDULE, diffusers_pipeline, diffusers_unet_and_vae
from reference_sdxl import diffusers_parts
from reference_text import for_transformers, hf_text_config

from ldm.checkpoints import read_checkpoint
from ldm.diffusers_folder import DiffusersFolder, folder_overrides
from ldm.diffusers_names import UNetLayout, unet_state_dict, vae_state_dict
from ldm.loading import (
    CONFIG_DIR,
    DerivedConfig,
    LoadError,
    checkpoint_hash,
    derived_config,
    instantiate_on_meta,
    load_config,
    load_model,
    params_from_shapes,
    resolve_config,
)
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import sample
from ldm.modules.attention import CrossAttention
from ldm.pipeline import Pipeline, Request
from ldm.pipeline.metadata import parameters_text

DDIM = dict(clip_sample=False, timestep_spacing="leading", **SCHEDULE)
STEPS, SCALE = 4, 6.0


def _v2_pipeline(checkpoint: Path, folder: Path, scheduler) -> StableDiffusionPipeline:
    """An SD 2.x pipeline as diffusers' converter makes them: the OpenCLIP tower as a Hugging Face CLIP model holding
    the blocks SD 2.x uses (all but the last: "penultimate"), no projection."""
    weights, _ = read_checkpoint(checkpoint)
    unet, vae = diffusers_unet_and_vae(weights, "tiny-v2.yaml")
    text = transformers.CLIPTextModel(hf_text_config(32, 2, 2, "gelu"))
    converted = single_file_utils.convert_open_clip_checkpoint(text, weights, prefix="cond_stage_model.model.")
    converted = {key: value for key, value in converted.items()  # drop the last block and the projection
                 if not key.startswith("text_projection") and ".layers.2." not in key}
    text.load_state_dict(for_transformers(text, converted), strict=True)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token="!", model_max_length=77)
    return StableDiffusionPipeline(vae=vae, text_encoder=text.eval(), tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory, hf_vocabulary) -> dict[str, Path]:
    """{"v1", "v1-bin", "v1-sharded", "v1-fp16", "v2-v", "xl", "ssd1b", "vega"}: diffusers folders."""
    root = tmp_path_factory.mktemp("diffusers-folders")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_vocabulary / name, root / name)
    made = {}
    v1 = diffusers_pipeline(tiny_checkpoints["v1", ".safetensors"], root, DDIMScheduler(**DDIM))
    for name, options in (("v1", {}), ("v1-bin", {"safe_serialization": False}),
                          ("v1-sharded", {"max_shard_size": "40KB"})):
        v1.save_pretrained(root / name, **options)
        made[name] = root / name
    v1.to(torch.float16).save_pretrained(root / "v1-fp16", variant="fp16")
    made["v1-fp16"] = root / "v1-fp16"
    v2 = _v2_pipeline(tiny_checkpoints["v2", ".safetensors"], root,
                      DDIMScheduler(prediction_type="v_prediction", **DDIM))
    v2.save_pretrained(root / "v2-v")
    made["v2-v"] = root / "v2-v"
    for family in ("xl", "ssd1b", "vega"):
        checkpoint = make_tiny_xl_checkpoint(root / f"{family}.safetensors", family, seed=4)
        parts = diffusers_parts(checkpoint, family, hf_vocabulary)
        StableDiffusionXLPipeline(**parts, scheduler=DDIMScheduler(**DDIM)).save_pretrained(
            root / family)
        made[family] = root / family
        made[family + "-checkpoint"] = checkpoint
    return made


def _same_weights(ours: torch.nn.Module, reference: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    expected = reference.state_dict()
    for key, value in ours.state_dict().items():
        if key.startswith(skip):
            continue
        assert torch.equal(value, expected[key].to(value.dtype)), key


@pytest.mark.parametrize("name", ["v1", "v1-bin", "v1-sharded", "v1-fp16"])
def test_sd1_folders_read_back_every_weight(folders, tiny_checkpoints, name):
    """safetensors, .bin (through the weights-only loader), sharded and fp16-variant folders: the model equals the
    single file the folder was made from (the fp16 one to fp16 rounding)."""
    config = resolve_config(folders[name])
    assert isinstance(config, DerivedConfig) and config.name == "v1-inference.yaml"
    model = load_model(folders[name])
    reference = load_model(tiny_checkpoints["v1", ".safetensors"], TEST_CONFIGS / "tiny-v1.yaml")
    assert model.state_dict().keys() == reference.state_dict().keys()
    if name == "v1-fp16":
        for parameter in reference.parameters():
            parameter.data = parameter.data.half().float()
    _same_weights(model, reference)
    assert model.parameterization == "eps" and model.scale_factor == reference.scale_factor


def test_xl_ssd1b_and_vega_folders_read_back_every_weight(folders):
    for family in ("xl", "ssd1b", "vega"):
        model = load_model(folders[family])
        reference = load_model(folders[family + "-checkpoint"], TEST_CONFIGS / f"tiny-{family}.yaml")
        assert model.state_dict().keys() == reference.state_dict().keys()
        _same_weights(model, reference, skip=("conditioner.embedders.1.model.logit_scale",))  # not in folders
        unet = model.model.diffusion_model
        assert UNetLayout.from_unet(unet) == UNetLayout.from_config(
            json.loads((folders[family] / "unet" / "config.json").read_text()))


def test_v2_folder_takes_v_prediction_from_its_scheduler(folders, tiny_checkpoints):
    """SD 2.x: the scheduler's prediction_type chooses the v config; diffusers' 2-block tower is SD 2.x's
    penultimate layer of the 3-block original, so the conditioning equals the original file's."""
    config = resolve_config(folders["v2-v"])
    assert config.name == "v2-inference-v.yaml"
    model = load_model(folders["v2-v"])
    assert model.parameterization == "v"
    original = load_model(tiny_checkpoints["v2", ".safetensors"], TEST_CONFIGS / "tiny-v2.yaml")
    torch.testing.assert_close(model.get_learned_conditioning([PROMPT]), original.get_learned_conditioning([PROMPT]),
                               atol=1e-6, rtol=0)
    assert load_model(folders["v2-v"], v_prediction=False).parameterization == "eps"  # a flag wins


@pytest.mark.parametrize("name", ["v1", "v2-v", "xl", "ssd1b", "vega"])
@torch.no_grad()
def test_same_image_as_diffusers_pipeline_from_the_same_folder(folders, name):
    """The folder loaded by diffusers (`from_pretrained`, its own DDIM scheduler) and by us (DDIM, CompVis' uniform
    steps, which are diffusers' "leading" + steps_offset 1), the same starting noise: the same image."""
    folder = folders[name]
    xl = name in ("xl", "ssd1b", "vega")
    pipeline_class = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(str(folder), **({} if xl else {"safety_checker": None}))
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=STEPS,
                     guidance_scale=SCALE, latents=x_T.clone(), output_type="pt").images
    model = load_model(folder)
    extra = dict(original_size=(64, 64), target_size=(64, 64)) if xl else {}
    cond = model.get_learned_conditioning([PROMPT], **extra)
    uncond = (model.get_unconditional_conditioning([NEGATIVE], **extra) if xl
              else model.get_learned_conditioning([NEGATIVE]))
    latents = sample(model, "ddim", STEPS, x_T.shape, cond, uncond, SCALE, ImageNoise([1]), x_T=x_T.clone(),
                     disable=True)
    ours = ((model.decode_first_stage(latents) + 1) / 2).clamp(0, 1)
    assert reference.std() > 0.01
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    assert (ours * 255).round().sub((reference * 255).round()).abs().max() <= 1  # images equal to 1/255


def test_txt2img_runs_a_folder_without_config(folders, tmp_path):
    from ldm.cli.txt2img import main

    outdir = tmp_path / "out"
    status = main(["--ckpt", str(folders["ssd1b"]), "--prompt", "a lighthouse", "--H", "64", "--W", "64",
                   "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--seed", "3", "--outdir", str(outdir),
                   "--skip_grid"])
    assert status == 0
    saved = sorted((outdir / "samples").glob("*.png"))
    assert len(saved) == 1
    image = Image.open(saved[0])
    assert np.array(image.convert("RGB")).std() > 1
    assert f"Model hash: {checkpoint_hash(folders['ssd1b'])}" in image.text["parameters"]
    assert checkpoint_hash(folders["ssd1b"]) == hashlib.sha256(
        (folders["ssd1b"] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:10]


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_folder_mistakes_are_refused_in_one_line(folders, tmp_path, capsys):
    from ldm.cli.txt2img import main

    cases = {}
    missing = _copy(folders["v1"], tmp_path / "missing")
    (missing / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    cases["missing"] = (missing, "holds no weights")
    escaping = _copy(folders["v1-sharded"], tmp_path / "escaping")
    index = escaping / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {key: "../../outside.safetensors" for key in data["weight_map"]}
    index.write_text(json.dumps(data))
    cases["escaping"] = (escaping, "outside its folder")
    projection = _copy(folders["xl"], tmp_path / "projection")  # a UNet kind this package does not build
    _edit_json(projection / "unet" / "config.json", class_embed_type="projection")
    cases["projection"] = (projection, "has a class embedding")
    zero_snr = _copy(folders["v1"], tmp_path / "zero-snr")
    _edit_json(zero_snr / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True)
    cases["zero-snr"] = (zero_snr, "rescale_betas_zero_snr")
    broken = _copy(folders["v1"], tmp_path / "broken")
    (broken / "vae" / "config.json").write_text("{not json")
    cases["broken"] = (broken, "cannot read")
    huge = _copy(folders["v1"], tmp_path / "huge")
    (huge / "unet" / "config.json").write_bytes(b" " * (5 << 20))
    cases["huge"] = (huge, "is 5242880 bytes")
    for name, component, changes, message in (
            ("heads", "text_encoder/config.json", {"num_attention_heads": "many"}, "does not divide"),
            ("unet-heads", "unet/config.json", {"attention_head_dim": 10 ** 9}, "is not a head count per level"),
            ("steps", "scheduler/scheduler_config.json", {"num_train_timesteps": 10 ** 9}, "is not a number in"),
            ("channels", "unet/config.json", {"in_channels": "four"}, "has the wrong form"),
            ("scale", "vae/config.json", {"scaling_factor": float("nan")}, "scaling_factor nan")):
        folder = _copy(folders["v1"], tmp_path / name)
        _edit_json(folder / component, **changes)
        cases[name] = (folder, message)
    plain = tmp_path / "plain-folder"
    plain.mkdir()
    cases["plain"] = (plain, "without model_index.json")
    for name, (folder, message) in cases.items():
        if name != "plain":
            with pytest.raises(LoadError, match=message):
                load_model(folder)
        status = main(["--ckpt", str(folder), "--prompt", "x", "--outdir", str(tmp_path / f"out-{name}"),
                       "--ddim_steps", "1"])
        error = capsys.readouterr().err.strip()
        assert status == 2 and message in error and len(error.splitlines()) == 1, (name, error)
        assert not (tmp_path / f"out-{name}" / "samples").exists() or not any(
            (tmp_path / f"out-{name}" / "samples").iterdir())


def test_folder_config_values_come_from_the_folder(folders):
    config = load_config(resolve_config(folders["xl"]))
    params = config.model.params
    assert params.scale_factor == json.loads((folders["xl"] / "vae" / "config.json").read_text())["scaling_factor"]
    assert params.network_config.params.model_channels == 32
    assert params.conditioner_config.params.emb_models[1].params.embed_dim == 16


def test_inpainting_folder_uses_the_inpainting_config(tmp_path, hf_vocabulary):
    checkpoint = make_tiny_checkpoint(tmp_path / "inpainting.safetensors", "v1-inpainting", seed=2)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_vocabulary / name, tmp_path / name)
    pipe = diffusers_pipeline(checkpoint, tmp_path, DDIMScheduler(**DDIM), config="tiny-v1-inpainting.yaml")
    pipe.save_pretrained(tmp_path / "folder")
    assert resolve_config(tmp_path / "folder").name == "v1-inpainting-inference.yaml"
    model = load_model(tmp_path / "folder")
    _same_weights(model, load_model(checkpoint, TEST_CONFIGS / "tiny-v1-inpainting.yaml"))


@pytest.mark.parametrize("layout", ["vae-folder", "model-folder", "diffusers-names-file"])
def test_vae_in_diffusers_layout_replaces_the_checkpoints(tiny_checkpoints, tmp_path, hf_vocabulary, layout):
    """--vae takes sdxl-vae-fp16-fix style files (diffusers' names in one .safetensors), VAE folders and model
    folders: the autoencoder becomes exactly the other model's."""
    other = make_tiny_checkpoint(tmp_path / "other.safetensors", "v1", seed=5)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_vocabulary / name, tmp_path / name)
    pipe = diffusers_pipeline(other, tmp_path, DDIMScheduler(**DDIM))
    if layout == "vae-folder":
        pipe.vae.save_pretrained(tmp_path / "vae")
        vae = tmp_path / "vae"
    elif layout == "model-folder":
        pipe.save_pretrained(tmp_path / "model")
        vae = tmp_path / "model"
    else:
        vae = write_checkpoint({key: value.contiguous() for key, value in pipe.vae.state_dict().items()},
                               tmp_path / "sdxl_vae.safetensors")
    model = load_model(tiny_checkpoints["v1", ".safetensors"], TEST_CONFIGS / "tiny-v1.yaml", vae=vae)
    expected = load_model(other, TEST_CONFIGS / "tiny-v1.yaml").first_stage_model
    _same_weights(model.first_stage_model, expected)
    base = load_model(tiny_checkpoints["v1", ".safetensors"], TEST_CONFIGS / "tiny-v1.yaml")
    _same_weights(model.model, base.model)


def test_sdxl_folder_keeps_its_empty_prompt_rule(folders, tmp_path):
    assert load_model(folders["xl"]).force_zeros_for_empty_prompt is True  # model_index.json says true
    copy = _copy(folders["xl"], tmp_path)
    _edit_json(copy / "model_index.json", force_zeros_for_empty_prompt=False)
    assert load_model(copy).force_zeros_for_empty_prompt is False


def _heads_per_layer(model: torch.nn.Module) -> dict[str, int]:
    return {name: module.heads for name, module in model.named_modules() if isinstance(module, CrossAttention)}


@pytest.mark.parametrize("name, family", [("v1-inference.yaml", "v1"), ("v2-inference-v.yaml", "v2"),
                                          ("sd_xl_base.yaml", "xl-base"), ("ssd-1b.yaml", "xl-base")])
def test_released_models_at_full_size_translate_exactly(name, family):
    """At the released sizes, on the meta device: our model's UNet and VAE keys through diffusers' own converters
    and back through ours give every key and shape again, and the config a folder with diffusers' configs for it
    would get has the released model's attention heads in every layer."""
    released = instantiate_on_meta(load_config(CONFIG_DIR / name).model)
    weights = released.state_dict()
    original = OmegaConf.to_container(OmegaConf.load(str(CONFIG_DIR / name)))
    unet_config = single_file_utils.create_unet_diffusers_config_from_ldm(original, weights)
    unet = {key.removeprefix("model.diffusion_model."): value for key, value in weights.items()
            if key.startswith("model.diffusion_model.")}
    back = unet_state_dict(single_file_utils.convert_ldm_unet_checkpoint(weights, unet_config),
                           UNetLayout.from_config(unet_config))
    assert {key: value.shape for key, value in back.items()} == {key: value.shape for key, value in unet.items()}
    assert UNetLayout.from_unet(released.model.diffusion_model) == UNetLayout.from_config(unet_config)
    vae_config = single_file_utils.create_vae_diffusers_config_from_ldm(original, weights)
    vae = {key.removeprefix("first_stage_model."): value for key, value in weights.items()
           if key.startswith("first_stage_model.")}
    back = vae_state_dict(single_file_utils.convert_ldm_vae_checkpoint(weights, vae_config))
    assert {key: tuple(value.shape) for key, value in back.items()} == {
        key: tuple(value.shape) for key, value in vae.items()}

    text = {"v1": {"text_encoder": (768, 12, "quick_gelu")}, "v2": {"text_encoder": (1024, 16, "gelu")},
            "xl-base": {"text_encoder": (768, 12, "quick_gelu"), "text_encoder_2": (1280, 20, "gelu")}}[family]
    configs = {"unet": unet_config, "vae": vae_config}
    configs.update({component: {"hidden_size": width, "num_attention_heads": heads, "hidden_act": activation}
                    for component, (width, heads, activation) in text.items()})
    folder = DiffusersFolder(Path("released"), configs, {"prediction_type": "v_prediction" if "-v" in name else
                                                         "epsilon"})
    shapes = {key: tuple(value.shape) for key, value in weights.items()}
    structure = params_from_shapes(shapes, family)
    derived = derived_config(CONFIG_DIR / name, {**structure, **folder_overrides(folder, structure)})
    rebuilt = instantiate_on_meta(load_config(derived).model)
    assert _heads_per_layer(rebuilt) == _heads_per_layer(released) != {}
    unused = "cond_stage_model.model.text_projection"  # SD 2.x folders hold none: built empty
    assert {key: value.shape for key, value in rebuilt.state_dict().items() if key != unused} == {
        key: value.shape for key, value in weights.items() if key != unused}


@torch.no_grad()
def test_ddim_on_trailing_timesteps_through_a_request_is_diffusers_ddim_trailing(folders):
    """Hyper-SD's and Lightning's "DDIM with trailing timesteps": `Request(sampler="ddim", scheduler="trailing")` on
    the SD 1.x folder gives diffusers' pipeline image with DDIMScheduler(timestep_spacing="trailing") from the same
    starting noise; the record says so."""
    pipeline = Pipeline.from_checkpoint(str(folders["v1"]), hash_files=False)
    request = Request(PROMPT, NEGATIVE, seed=21, steps=STEPS, sampler="ddim", scheduler="trailing", scale=SCALE,
                      height=64, width=64)
    result = pipeline(request)
    x_T = pipeline.noise(request).randn((1, 4, 8, 8), device=torch.device("cpu"), dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(str(folders["v1"]), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=STEPS,
                     guidance_scale=SCALE, latents=x_T, output_type="np").images[0]
    assert np.abs(result.pixels[0].astype(int) - np.round(reference * 255).astype(int)).max() <= 1
    leading = pipeline(request.replace(scheduler="leading"))
    assert not np.array_equal(leading.pixels, result.pixels)  # a different spacing, a different image
    assert np.array_equal(leading.pixels, pipeline(request.replace(scheduler=None)).pixels)  # CompVis' own spacing
    assert "Schedule type: Trailing" in parameters_text(result.records[0])


def test_sdxl_base_and_refiner_folders_make_the_single_files_image(tiny_xl_checkpoints, hf_vocabulary, tmp_path,
                                                                   capsys):
    """A base folder with --refiner a refiner folder (text_encoder_2 alone): the same pixels as the two single files
    the folders were made from, with the same flags."""
    from ldm.cli.txt2img import main

    base = StableDiffusionXLPipeline(**diffusers_parts(tiny_xl_checkpoints["xl"], "xl", hf_vocabulary),
                                     scheduler=DDIMScheduler(**DDIM))
    base.save_pretrained(tmp_path / "base")
    refiner = StableDiffusionXLImg2ImgPipeline(
        **diffusers_parts(tiny_xl_checkpoints["xl-refiner"], "xl-refiner", hf_vocabulary), text_encoder=None,
        tokenizer=None, scheduler=DDIMScheduler(**DDIM), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False)  # as the released refiner's model_index.json says
    refiner.save_pretrained(tmp_path / "refiner")
    assert resolve_config(tmp_path / "refiner").name == "sd_xl_refiner.yaml"
    # the single files with their tiny configs (the refiner's beside it, as its own); folders need none
    refiner_file = Path(shutil.copy(tiny_xl_checkpoints["xl-refiner"], tmp_path / "refiner_file.safetensors"))
    shutil.copy(TEST_CONFIGS / "tiny-xl-refiner.yaml", tmp_path / "refiner_file.yaml")
    flags = ["--prompt", PROMPT, "--H", "64", "--W", "64", "--ddim_steps", "4", "--n_samples", "1", "--n_iter", "1",
             "--seed", "5", "--sampler", "euler", "--scale", "5", "--skip_grid", "--no_metadata"]
    made = {}
    for name, (ckpt, refiner_path, configs) in {
            "folders": (tmp_path / "base", tmp_path / "refiner", []),
            "files": (tiny_xl_checkpoints["xl"], refiner_file,
                      ["--config", str(TEST_CONFIGS / "tiny-xl.yaml")])}.items():
        status = main(["--ckpt", str(ckpt), "--refiner", str(refiner_path), *configs, *flags,
                       "--outdir", str(tmp_path / name)])
        assert status == 0, capsys.readouterr().err
        made[name] = np.array(Image.open(tmp_path / name / "samples" / "00000.png"))
    assert np.array_equal(made["folders"], made["files"]) and made["files"].std() > 1


def test_img2img_on_a_folder_makes_the_files_image(folders, tiny_checkpoints, tmp_path, capsys):
    """scripts/img2img.py takes a folder as --ckpt as txt2img does: the same image as from the file it was made from
    (with the file's tiny config)."""
    from ldm.cli.img2img import main as img2img

    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(init)
    flags = ["--init-img", str(init), "--prompt", PROMPT, "--strength", "0.6", "--ddim_steps", "4", "--n_samples",
             "1", "--n_iter", "1", "--seed", "2", "--skip_grid", "--no_metadata"]
    made = {}
    for name, model_flags in {"folder": ["--ckpt", str(folders["v1"])],
                              "file": ["--ckpt", str(tiny_checkpoints["v1", ".safetensors"]), "--config",
                                       str(TEST_CONFIGS / "tiny-v1.yaml")]}.items():
        status = img2img([*model_flags, *flags, "--outdir", str(tmp_path / name)])
        assert status == 0, capsys.readouterr().err
        made[name] = np.asarray(Image.open(tmp_path / name / "samples" / "00000.png"))
    assert np.array_equal(made["folder"], made["file"]) and made["file"].std() > 1
