"""ControlNet (cldm.cldm, ldm.controlnet, txt2img --controlnet) against diffusers' ControlNetModel and
StableDiffusionControlNetPipeline on the same tiny random weights (tests/configs/tiny-cldm-v1.yaml), plus the file
layouts lllyasviel's and the pruned releases use."""
from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from diffusers.loaders import single_file_utils
from omegaconf import OmegaConf

from checkpoint_factory import TEST_CONFIGS, random_state_dict, write_checkpoint
from cldm.cldm import ControlNet, control_residuals
from image_files import parameters, pixels, sidecar
from ldm.controlnet import CONFIG_DIR, attach_controlnet, load_controlnet
from ldm.loading import LoadError, load_model, parameters_on_meta
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.optimize import disable_graphs, enable_graphs
from ldm.util import instantiate_from_config
from reference_sd import NEGATIVE, PROMPT, SCALE, SCHEDULE, STEPS, diffusers_pipeline
from replaying_capture import ReplayingCapture

CLDM_CONFIG = TEST_CONFIGS / "tiny-cldm-v1.yaml"
SIZE = 64  # pixels: the tiny UNet's latents are 8x8
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """One random tiny ControlLDM written in every layout: the whole ControlLDM ("full", as ControlNet 1.0),
    `control_model.*` alone ("control", 1.1), prefix-less fp16 ("pruned"), and the base model alone ("base")."""
    folder = tmp_path_factory.mktemp("controlnet")
    state_dict = random_state_dict(CLDM_CONFIG, seed=5)
    control = {key: value for key, value in state_dict.items() if key.startswith("control_model.")}
    base = {key: value for key, value in state_dict.items() if not key.startswith("control_model.")}
    pruned = {key[len("control_model."):]: value.half() for key, value in control.items()}
    return {"state_dict": state_dict,
            "full": write_checkpoint(state_dict, folder / "control_sd15_tiny.pth"),
            "control": write_checkpoint(control, folder / "control_v11p_sd15_tiny.pth", lightning=False),
            "pruned": write_checkpoint(pruned, folder / "control_v11p_sd15_tiny_fp16.safetensors"),
            "base": write_checkpoint(base, folder / "tiny-base.ckpt")}


@pytest.fixture(scope="module")
def controlnet(files) -> ControlNet:
    return load_controlnet(files["control"], CLDM_CONFIG)


def hint_image(seed: int = 0, batch: int = 1) -> torch.Tensor:
    """A random RGB control image in [0, 1] at the output size."""
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def diffusers_controlnet_config(original: dict, state_dict: dict) -> dict:
    """What diffusers' create_controlnet_diffusers_config_from_ldm returns; in this diffusers release that function
    calls create_unet_diffusers_config_from_ldm without the checkpoint and fails, so its field picks are made here."""
    unet = single_file_utils.create_unet_diffusers_config_from_ldm(original, state_dict)
    fields = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
              "attention_head_dim", "use_linear_projection", "class_embed_type", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim", "transformer_layers_per_block")
    hint_channels = original["model"]["params"]["control_stage_config"]["params"]["hint_channels"]
    return {"conditioning_channels": hint_channels, **{field: unet[field] for field in fields}}


def diffusers_controlnet(state_dict: dict, **options) -> ControlNetModel:
    """diffusers' ControlNetModel from our ControlLDM state dict with diffusers' own single-file converter."""
    original = OmegaConf.to_container(OmegaConf.load(str(CLDM_CONFIG)))
    config = diffusers_controlnet_config(original, state_dict)
    model = ControlNetModel(**config, **options)
    model.load_state_dict(single_file_utils.convert_controlnet_checkpoint(state_dict, config), strict=True)
    return model.eval()


@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "global-average-pooling"])
@torch.no_grad()
def test_residuals_equal_diffusers_controlnet(files, tmp_path, pooled):
    """Also ControlNet 1.1 shuffle's global average pooling, which its yaml turns on (diffusers: global_pool_conditions)."""
    config = OmegaConf.load(str(CLDM_CONFIG))
    config.model.params.global_average_pooling = pooled
    OmegaConf.save(config, tmp_path / "control.yaml")
    controlnet = load_controlnet(files["control"], tmp_path / "control.yaml")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 32, generator=generator)
    timesteps = torch.tensor([999, 421])
    hint = hint_image(2, batch=2)
    ours = control_residuals(controlnet, x, hint, timesteps, context, 0.7)
    reference_model = diffusers_controlnet(files["state_dict"], global_pool_conditions=pooled)
    down, middle = reference_model(x, timesteps, context, hint, conditioning_scale=0.7, return_dict=False)
    reference = [*down, middle]
    assert len(ours) == len(reference) == 5  # 4 input blocks of the tiny UNet, then the middle block
    assert all((residual.shape[-1] == 1) == pooled for residual in ours)
    assert all(residual.abs().max() > 0.01 for residual in reference)  # random zero convs: real residuals
    for mine, theirs in zip(ours, reference):
        # Random weights grow activations to ~200 by the middle block: the error is measured against each residual's
        # own scale (float32 timestep embeddings, computed slightly differently by each, differ by ~1e-7 relative).
        assert mine.shape == theirs.shape
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


@torch.no_grad()
def test_sd2_style_residuals_equal_diffusers_controlnet(tmp_path):
    """The cldm_v21 shape (linear transformer projections, a head width instead of a head count) on tiny-v2's UNet."""
    config = OmegaConf.load(str(TEST_CONFIGS / "tiny-v2.yaml"))
    control_params = {key: value for key, value in config.model.params.unet_config.params.items()
                      if key != "out_channels"}
    config.model.target = "cldm.cldm.ControlLDM"
    config.model.params.control_stage_config = {"target": "cldm.cldm.ControlNet",
                                                "params": {**control_params, "hint_channels": 3}}
    OmegaConf.save(config, tmp_path / "tiny-cldm-v2.yaml")
    state_dict = random_state_dict(tmp_path / "tiny-cldm-v2.yaml", seed=2)
    path = write_checkpoint({key: value for key, value in state_dict.items() if key.startswith("control_model.")},
                            tmp_path / "control_sd21_tiny.safetensors")
    controlnet = load_controlnet(path, tmp_path / "tiny-cldm-v2.yaml")
    original = OmegaConf.to_container(config)
    reference_model = ControlNetModel(**diffusers_controlnet_config(original, state_dict)).eval()
    reference_model.load_state_dict(single_file_utils.convert_controlnet_checkpoint(
        state_dict, reference_model.config), strict=True)
    generator = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 32, generator=generator)
    timesteps, hint = torch.tensor([640]), hint_image(5)
    down, middle = reference_model(x, timesteps, context, hint, conditioning_scale=1.0, return_dict=False)
    for mine, theirs in zip(control_residuals(controlnet, x, hint, timesteps, context, 1.0), [*down, middle]):
        assert mine.shape == theirs.shape
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def our_controlled_image(files, controlnet, x_T: torch.Tensor, hint: torch.Tensor, scale: float) -> torch.Tensor:
    model = load_model(files["base"], TEST_CONFIGS / "tiny-v1.yaml")
    c, uc = model.get_learned_conditioning([PROMPT]), model.get_learned_conditioning([NEGATIVE])
    with attach_controlnet(model, controlnet, hint, scale):
        samples, _ = DDIMSampler(model).sample(S=STEPS, conditioning=c, batch_size=1, shape=[4, 8, 8], verbose=False,
                                               unconditional_guidance_scale=SCALE, unconditional_conditioning=uc,
                                               eta=0.0, x_T=x_T)
    return ((model.decode_first_stage(samples) + 1) / 2).clamp(0, 1)


@torch.no_grad()
def test_image_equals_diffusers_controlnet_pipeline(files, controlnet, tmp_path):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    hint, scale = hint_image(3), 0.8
    ours = our_controlled_image(files, controlnet, x_T, hint, scale)
    parts = diffusers_pipeline(files["base"], tmp_path, DDIMScheduler(clip_sample=False, timestep_spacing="leading",
                                                                      **SCHEDULE)).components
    pipe = StableDiffusionControlNetPipeline(**{name: parts[name] for name in (
        "vae", "text_encoder", "tokenizer", "unet", "scheduler")}, controlnet=diffusers_controlnet(files["state_dict"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, image=hint, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                     num_inference_steps=STEPS, guidance_scale=SCALE, controlnet_conditioning_scale=scale,
                     latents=x_T.clone(), output_type="pt").images
    uncontrolled = pipe(PROMPT, image=hint, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                        num_inference_steps=STEPS, guidance_scale=SCALE, controlnet_conditioning_scale=0.0,
                        latents=x_T.clone(), output_type="pt").images
    assert ours.shape == reference.shape == (1, 3, SIZE, SIZE)
    assert (reference - uncontrolled).abs().max() > 0.05  # the ControlNet changes the image
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


@torch.no_grad()
def test_no_control_leaves_the_unet_bit_identical(files, controlnet):
    model = load_model(files["base"], TEST_CONFIGS / "tiny-v1.yaml")
    unet = model.model.diffusion_model
    generator = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 3, 32, generator=generator)
    t = torch.tensor([500, 20])
    plain = unet(x, t, context=context)
    zeros = [torch.zeros_like(residual) for residual in control_residuals(controlnet, x, hint_image(), t, context, 1)]
    assert torch.equal(unet(x, t, context=context, control=None), plain)
    assert torch.equal(unet(x, t, context=context, control=zeros), plain)
    attached = attach_controlnet(model, controlnet, hint_image(), 1.0)
    assert not torch.equal(model.apply_model(x, t, context), plain)
    attached.remove()
    assert torch.equal(model.apply_model(x, t, context), plain)
    with pytest.raises(ValueError, match="control has 3 residuals but this UNet takes 5"):
        unet(x, t, context=context, control=zeros[:3])


@torch.no_grad()
def test_control_ldm_from_the_published_config_layout(files, controlnet):
    """cldm.cldm.ControlLDM (what cldm_v15.yaml builds) with ControlNet's conditioning dict gives what
    attach_controlnet gives, and two attached ControlNets add their residuals."""
    ldm = instantiate_from_config(OmegaConf.load(str(CLDM_CONFIG)).model).eval()
    ldm.load_state_dict(files["state_dict"], strict=True)
    ldm.control_scales = [0.5] * 5
    generator = torch.Generator().manual_seed(6)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 3, 32, generator=generator)
    t, hint = torch.tensor([900, 300]), hint_image(8)
    controlled = ldm.apply_model(x, t, {"c_crossattn": [context], "c_concat": [hint]})
    plain = ldm.apply_model(x, t, {"c_crossattn": [context], "c_concat": None})
    model = load_model(files["base"], TEST_CONFIGS / "tiny-v1.yaml")
    torch.testing.assert_close(plain, model.apply_model(x, t, context), atol=0, rtol=0)
    with attach_controlnet(model, controlnet, hint, 0.5):
        torch.testing.assert_close(model.apply_model(x, t, context), controlled, atol=1e-6, rtol=0)
    with attach_controlnet(model, controlnet, hint, 0.25), attach_controlnet(model, controlnet, hint, 0.25):
        torch.testing.assert_close(model.apply_model(x, t, context), controlled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["full", "control", "pruned"])
def test_every_release_layout_loads_the_same_weights(files, layout):
    loaded = load_controlnet(files[layout], CLDM_CONFIG).state_dict()
    expected = {key[len("control_model."):]: value for key, value in files["state_dict"].items()
                if key.startswith("control_model.")}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        reference = value.half().float() if layout == "pruned" else value
        assert torch.equal(loaded[key], reference), key


def test_config_beside_the_file_is_used(files, tmp_path):
    path = tmp_path / "my_controlnet.safetensors"
    shutil.copy(files["pruned"], path)
    with pytest.raises(LoadError, match="cannot tell which config .* 32-wide .* put its yaml beside it as "
                                        "my_controlnet.yaml"):
        load_controlnet(path)
    shutil.copy(CLDM_CONFIG, tmp_path / "my_controlnet.yaml")
    assert isinstance(load_controlnet(path, dtype=torch.float16), ControlNet)


def test_bad_files_are_refused_in_one_line(files, tmp_path, tiny_checkpoint):
    diffusers_layout = write_checkpoint({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1)},
                                        tmp_path / "diffusion_pytorch_model.safetensors")
    difference = write_checkpoint({"difference": torch.zeros(1), "control_model.time_embed.0.weight": torch.zeros(1)},
                                  tmp_path / "diff_control_sd15_canny.safetensors")
    garbage = tmp_path / "notes.pth"
    garbage.write_bytes(b"not a checkpoint")
    cases = [(tiny_checkpoint, "Stable Diffusion checkpoint without a ControlNet: pass it as --ckpt"),
             (diffusers_layout, "ControlNet in diffusers' layout with weights no ControlNet here has"),
             (difference, "'difference' ControlNet .* not supported: use the full ControlNet file"),
             (garbage, "notes.pth"),
             (files["control"], "does not fit config cldm_v21.yaml: .* of another shape")]
    for path, message in cases:
        config = CONFIG_DIR / "cldm_v21.yaml" if path == files["control"] else CLDM_CONFIG
        with pytest.raises(LoadError, match=message) as error:
            load_controlnet(path, config)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("form", ["folder", "file"])
@torch.no_grad()
def test_diffusers_layout_controlnets_read_back_every_weight(files, controlnet, tmp_path, form):
    """What diffusers' `save_pretrained` writes (a folder, as lllyasviel/control_v11p_sd15_canny on the hub) and its
    weights alone in one .safetensors: the same ControlNet as the original file, weight for weight."""
    reference = diffusers_controlnet(files["state_dict"])
    if form == "folder":
        reference.save_pretrained(tmp_path / "control_v11p_sd15_tiny")
        path = tmp_path / "control_v11p_sd15_tiny"
    else:
        path = write_checkpoint({key: value.contiguous() for key, value in reference.state_dict().items()},
                                tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = load_controlnet(path, CLDM_CONFIG)
    expected = controlnet.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())


def test_sd2_controlnet_on_sd1_model_says_so():
    """A ControlNet's family is told by its cross-attention width (768: SD 1.x, 1024: SD 2.x)."""
    shape = dict(image_size=8, in_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[1],
                 channel_mult=[1], num_heads=2, use_spatial_transformer=True, legacy=False)
    sd2_controlnet = ControlNet(hint_channels=3, context_dim=1024, use_linear_in_transformer=True, **shape)
    sd1_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=UNetModel(out_channels=4, context_dim=768,
                                                                                **shape)))
    with pytest.raises(ValueError, match=r"is for SD 2\.x \(text embeddings 1024 wide\) but the model is SD 1\.x"):
        attach_controlnet(sd1_model, sd2_controlnet, hint_image())


def test_released_configs_have_the_released_key_layout():
    """cldm_v15/v21.yaml build exactly the keys and shapes diffusers' converter reads from lllyasviel's files."""
    for name in ("cldm_v15.yaml", "cldm_v21.yaml"):
        original = OmegaConf.to_container(OmegaConf.load(str(CONFIG_DIR / name)))
        with parameters_on_meta():
            ours = instantiate_from_config(original["model"]["params"]["control_stage_config"]).state_dict()
        config = diffusers_controlnet_config(original, ours)
        with torch.device("meta"):
            reference = ControlNetModel(**config).state_dict()
        converted = single_file_utils.convert_controlnet_checkpoint(ours, config)
        assert len(converted) == len(ours) == len(reference), name
        assert {key: tuple(value.shape) for key, value in converted.items()} == {
            key: tuple(value.shape) for key, value in reference.items()}, name


# --- replayed graphs ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_replayed_graphs_include_the_controlnet_residuals(files, controlnet):
    """With graphs on (--cuda_graphs), an attached ControlNet still steers every call: its residuals are arguments
    of the replayed UNet, so a replay equals the eager call with the ControlNet attached, for each hint and scale."""
    model = load_model(files["base"], TEST_CONFIGS / "tiny-v1.yaml")
    generator = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([999, 301])
    cond = model.get_learned_conditioning(["a red cube", ""])
    expected = {}
    for hint, scale in ((1, 0.7), (2, 0.3)):
        with attach_controlnet(model, controlnet, hint_image(hint), scale):
            expected[hint] = model.apply_model(x, t, cond)
    plain = model.apply_model(x, t, cond)
    capture = ReplayingCapture()
    assert enable_graphs(model, capture=capture) == 1
    for hint, scale in ((1, 0.7), (1, 0.7), (2, 0.3)):  # capture, replay, replay with other residuals
        with attach_controlnet(model, controlnet, hint_image(hint), scale):
            assert torch.equal(model.apply_model(x, t, cond), expected[hint])
    assert capture.captures == 1
    assert torch.equal(model.apply_model(x, t, cond), plain)  # without control: another signature, another graph
    assert capture.captures == 2 and not torch.equal(expected[1], plain)
    disable_graphs(model)
    assert model.model.diffusion_model.graph_runner is None


# --- txt2img --controlnet --------------------------------------------------------------------------------------------
@pytest.fixture
def cli_files(files, tmp_path) -> dict:
    """A ControlNet file with its yaml beside it (as ControlNet 1.1 ships them) and a control image of another size
    than the output, so it is resized."""
    from PIL import Image

    path = tmp_path / "control_tiny.pth"
    shutil.copy(files["control"], path)
    shutil.copy(CLDM_CONFIG, tmp_path / "control_tiny.yaml")
    image = tmp_path / "edges.png"
    Image.fromarray((hint_image(9)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")[:40, :48]).save(image)
    return {"controlnet": path, "image": image}


def test_cli_writes_the_controlled_image_with_its_metadata(txt2img, cli_files, files, tmp_path):
    from ldm.checkpoints import model_hash

    flags = ("--controlnet", cli_files["controlnet"], "--control_image", cli_files["image"])
    runs = {}
    for name, extra in (("plain", ()), ("zero", ("--control_scale", 0)), ("half", ("--control_scale", 0.5))):
        status, out, err = txt2img(*(() if name == "plain" else flags), *extra, "--seed", 3, "--skip_grid",
                                   outdir=tmp_path / name)
        assert status == 0, err
        runs[name] = tmp_path / name / "samples" / "00000.png"
    assert (pixels(runs["zero"]) == pixels(runs["plain"])).all()  # strength 0 leaves the UNet untouched
    assert (pixels(runs["half"]) != pixels(runs["plain"])).any()
    text = parameters(runs["half"])
    assert (f"ControlNet: control_tiny.pth, ControlNet hash: {model_hash(cli_files['controlnet'])}, Control image: "
            f"edges.png, Control image hash: {model_hash(cli_files['image'])}, Control scale: 0.5") in text
    recorded = sidecar(runs["half"])
    assert recorded["controlnet"] == "control_tiny.pth" and recorded["control_scale"] == 0.5
    # the same ControlNet as a diffusers folder (its yaml beside it, as for the file): the same image
    folder = tmp_path / "control_tiny_diffusers"
    diffusers_controlnet(files["state_dict"]).save_pretrained(folder)
    shutil.copy(CLDM_CONFIG, tmp_path / "control_tiny_diffusers.yaml")
    status, out, err = txt2img("--controlnet", folder, "--control_image", cli_files["image"], "--control_scale", 0.5,
                               "--seed", 3, "--skip_grid", outdir=tmp_path / "folder")
    assert status == 0, err
    assert (pixels(tmp_path / "folder" / "samples" / "00000.png") == pixels(runs["half"])).all()


def test_cli_refuses_bad_controlnet_input_before_writing(txt2img, cli_files, tmp_path, tiny_checkpoint):
    shape = dict(image_size=8, in_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[1],
                 channel_mult=[1], num_heads=2, use_spatial_transformer=True, legacy=False, hint_channels=3)
    sd2 = write_checkpoint(ControlNet(context_dim=1024, **shape).state_dict(), tmp_path / "sd21_control.safetensors")
    cases = [(("--controlnet", cli_files["controlnet"], "--control_image", tmp_path / "missing.png"),
              "--control_image .*missing.png not found"),
             (("--controlnet", cli_files["controlnet"]), "--control_image is required"),
             (("--control_image", cli_files["image"]), "--control_image needs --controlnet"),
             (("--controlnet", tmp_path / "nope.pth", "--control_image", cli_files["image"]), "nope.pth not found"),
             (("--controlnet", tiny_checkpoint, "--control_image", cli_files["image"]),
              "Stable Diffusion checkpoint without a ControlNet"),
             (("--controlnet", sd2, "--control_image", cli_files["image"]),
              r"ControlNet for SD 2\.x but --ckpt .* is SD 1\.x"),
             (("--controlnet", cli_files["controlnet"], "--control_image", cli_files["image"], "--control_scale", 3),
              "outside \\[0, 2\\]")]
    for flags, message in cases:
        status, _, err = txt2img(*flags, outdir=tmp_path / "out")
        assert status == 2, (flags, err)
        assert re.search(message, err), err
        assert not (tmp_path / "out").exists()


def test_cli_metadata_remakes_the_controlled_image(txt2img, cli_files, tmp_path):
    flags = ("--controlnet", cli_files["controlnet"], "--control_image", cli_files["image"])
    status, _, err = txt2img(*flags, "--control_scale", 0.7, "--seed", 11, "--skip_grid", outdir=tmp_path / "first")
    assert status == 0, err
    made = tmp_path / "first" / "samples" / "00000.png"
    status, _, err = txt2img("--metadata_from", made, outdir=tmp_path / "without")
    assert status == 0 and "steered by the ControlNet control_tiny.pth with the control image edges.png" in err
    for source in (made, made.with_suffix(".yaml")):  # the PNG text and the sidecar; the scale comes from them
        outdir = tmp_path / f"again-{source.suffix[1:]}"
        status, _, err = txt2img(*flags, "--metadata_from", source, "--skip_grid", outdir=outdir)
        assert status == 0, err
        assert (pixels(outdir / "samples" / "00000.png") == pixels(made)).all()
