"""SSD-1B and Segmind Vega single files (SDXL key layout, distilled UNets): the config read from the keys, the shipped
configs, parity with diffusers' UNet2DConditionModel built with `transformer_layers_per_block` and
`reverse_transformer_layers_per_block`, both text-encoder layouts in circulation, and the CLI with no --config."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_factory import TEST_CONFIGS, make_tiny_xl_checkpoint, write_checkpoint
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils
from reference_sdxl import diffusers_vector, distilled_unet_config

from ldm.checkpoint_layout import unet_params_from_shapes
from ldm.checkpoints import read_checkpoint, read_shapes
from ldm.loading import (
    CONFIG_DIR,
    DerivedConfig,
    LoadError,
    load_config,
    load_model,
    parameters_on_meta,
    resolve_config,
)
from ldm.util import instantiate_from_config

RELEASED = {"ssd1b": "ssd-1b.yaml", "vega": "segmind-vega.yaml"}
OPEN_CLIP = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("distilled-xl")
    return {family: make_tiny_xl_checkpoint(folder / f"tiny-{family}.safetensors", family, seed=11)
            for family in ("ssd1b", "vega")}


def _unet_outputs(model, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 128, generator=generator)
    y = torch.randn(2, 80, generator=generator)
    with torch.no_grad():
        return x, context, model.model.diffusion_model(x, torch.tensor([999, 250]), context, y)


@pytest.mark.parametrize("family", ["ssd1b", "vega"])
def test_loads_without_config_from_its_keys_and_with_the_tiny_yaml(checkpoints, family):
    path = checkpoints[family]
    resolved = resolve_config(path)
    assert isinstance(resolved, DerivedConfig) and resolved == CONFIG_DIR / "sd_xl_base.yaml"
    derived = load_model(path)
    given = load_model(path, TEST_CONFIGS / f"tiny-{family}.yaml")
    assert derived.state_dict().keys() == given.state_dict().keys()
    for key, value in given.state_dict().items():
        assert torch.equal(derived.state_dict()[key], value), key
    *_, ours = _unet_outputs(derived)
    *_, reference = _unet_outputs(given)
    torch.testing.assert_close(ours, reference, atol=0, rtol=0)
    conditioning = derived.get_learned_conditioning(["a lighthouse"], target_size=(64, 64))
    expected = given.get_learned_conditioning(["a lighthouse"], target_size=(64, 64))
    torch.testing.assert_close(conditioning["crossattn"], expected["crossattn"], atol=0, rtol=0)
    torch.testing.assert_close(conditioning["vector"], expected["vector"], atol=0, rtol=0)
    unet = derived.model.diffusion_model
    assert len(unet.middle_block) == 1  # a single res block, as released
    depths = unet_params_from_shapes(read_shapes(path))
    assert depths["transformer_depth_middle"] == 0
    assert depths["transformer_depth_input"] == load_config(TEST_CONFIGS / f"tiny-{family}.yaml").model.params[
        "network_config"]["params"]["transformer_depth_input"]


@pytest.mark.parametrize("family", ["ssd1b", "vega"])
def test_shipped_configs_are_the_released_architectures(family):
    """configs/stable-diffusion/ssd-1b.yaml and segmind-vega.yaml at full size on the meta device: the UNet's size
    as Segmind gives it, exactly the keys diffusers' converter makes of diffusers' own UNet with the released
    config, and the file recognised by its keys (the yaml is chosen with no --config)."""
    config = load_config(CONFIG_DIR / RELEASED[family])
    with parameters_on_meta():
        model = instantiate_from_config(config.model)
    unet = model.model.diffusion_model
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    assert parameters == {"ssd1b": 1_331_334_404, "vega": 745_225_604}[family]  # 1.3B and 745M
    checkpoint = {key: value for key, value in model.state_dict().items() if key.startswith("model.diffusion_model.")}
    unet_config = distilled_unet_config(family, widths=(320, 640, 1280), heads=(5, 10, 20), context=2048,
                                        time_embedding=256, vector=2816)
    with torch.device("meta"):
        reference = UNet2DConditionModel(**unet_config)
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config)
    assert {key: tuple(value.shape) for key, value in converted.items()} == {
        key: tuple(value.shape) for key, value in reference.state_dict().items()}
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert resolve_config("SSD-1B.safetensors", shapes=shapes) == CONFIG_DIR / RELEASED[family]
    assert not isinstance(resolve_config("x.safetensors", shapes=shapes), DerivedConfig)


@pytest.mark.parametrize("family", ["ssd1b", "vega"])
@torch.no_grad()
def test_unet_matches_diffusers_with_per_block_transformer_layers(checkpoints, family):
    model = load_model(checkpoints[family])
    checkpoint, _ = read_checkpoint(checkpoints[family])
    unet_config = distilled_unet_config(family)
    reference = UNet2DConditionModel(**unet_config).eval()
    reference.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 128, generator=generator)
    pooled = torch.randn(2, 32, generator=generator)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 64, 8, 16, 64, 128]])
    timesteps = torch.tensor([999, 261])
    ours = model.model.diffusion_model(x, timesteps, context, diffusers_vector(reference, pooled, time_ids))
    theirs = reference(x, timesteps, encoder_hidden_states=context,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    assert theirs.std() > 0.1 and relative < 1e-4, relative


def _diffusers_script_layout(checkpoint: dict[str, torch.Tensor], position_ids: bool) -> dict[str, torch.Tensor]:
    """What diffusers' convert_diffusers_to_original_sdxl.py writes for the OpenCLIP encoder: transformers'
    `text_projection.weight` ([embed_dim, width], OpenCLIP's matrix transposed), no `logit_scale`; Segmind's 2023
    files (written with transformers of the time) also hold the encoders' `position_ids` buffers."""
    converted = {key: value for key, value in checkpoint.items() if key != OPEN_CLIP + "logit_scale"}
    converted[OPEN_CLIP + "text_projection.weight"] = converted.pop(OPEN_CLIP + "text_projection").t().contiguous()
    if position_ids:
        converted[OPEN_CLIP + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
        converted["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return converted


@pytest.mark.parametrize("layout", ["segmind-2023", "diffusers-script", "no-logit-scale"])
def test_both_text_encoder_layouts_in_circulation_load(checkpoints, tmp_path, layout):
    original, _ = read_checkpoint(checkpoints["ssd1b"])
    original = dict(original)
    if layout == "no-logit-scale":
        changed = {key: value for key, value in original.items() if key != OPEN_CLIP + "logit_scale"}
    else:
        changed = _diffusers_script_layout(original, position_ids=layout == "segmind-2023")
    assert changed[OPEN_CLIP + "text_projection" + (".weight" if layout != "no-logit-scale" else "")].shape != \
        original[OPEN_CLIP + "text_projection"].shape or layout == "no-logit-scale"  # [32, 64] vs [64, 32]
    path = write_checkpoint(changed, tmp_path / f"ssd1b-{layout}.safetensors")
    reference = load_model(checkpoints["ssd1b"], TEST_CONFIGS / "tiny-ssd1b.yaml")
    expected = reference.get_learned_conditioning(["a red circle"], target_size=(64, 64))
    for config in (None, TEST_CONFIGS / "tiny-ssd1b.yaml"):
        model = load_model(path, config)
        torch.testing.assert_close(model.conditioner.embedders[1].model.text_projection,
                                   reference.conditioner.embedders[1].model.text_projection, atol=0, rtol=0)
        conditioning = model.get_learned_conditioning(["a red circle"], target_size=(64, 64))
        torch.testing.assert_close(conditioning["vector"], expected["vector"], atol=0, rtol=0)
        torch.testing.assert_close(conditioning["crossattn"], expected["crossattn"], atol=0, rtol=0)


def test_keys_that_no_unet_has_are_refused_with_advice(checkpoints, tmp_path):
    original, _ = read_checkpoint(checkpoints["vega"])
    broken = {key: value for key, value in original.items() if not key.startswith("model.diffusion_model.out.")}
    path = write_checkpoint(broken, tmp_path / "broken.safetensors")
    with pytest.raises(LoadError, match="model.diffusion_model.out.2.weight; pass its --config"):
        load_model(path)


def test_txt2img_runs_ssd1b_without_config(checkpoints, tmp_path):
    from PIL import Image

    from ldm.cli.txt2img import main

    outdir = tmp_path / "out"
    status = main(["--ckpt", str(checkpoints["ssd1b"]), "--prompt", "a lighthouse at dusk", "--negative_prompt",
                   "blurry", "--H", "64", "--W", "64", "--ddim_steps", "2", "--sampler", "unipc", "--scale", "12",
                   "--n_samples", "1", "--n_iter", "1", "--seed", "3", "--outdir", str(outdir), "--skip_grid",
                   "--no_metadata"])
    assert status == 0
    saved = sorted((outdir / "samples").glob("*.png"))
    assert len(saved) == 1
    pixels = np.array(Image.open(saved[0]).convert("RGB"))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1
