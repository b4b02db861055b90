"""Kohya LoRA files for SDXL (UNet, CLIP ViT-L as lora_te1_, OpenCLIP bigG as lora_te2_; the refiner's bigG as
lora_te_): the merged weights against the arithmetic on the checkpoint, the conditioning against transformers'
CLIP towers patched by hand and diffusers' own LoRA loading, txt2img's --lora, and LoRAs for the other family."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_factory import TEST_CONFIGS, write_checkpoint, write_lora as write_sd1_lora
from ldm.checkpoints import read_checkpoint
from ldm.loading import load_model
from ldm.lora import LoraError, apply_lora
from reference_sdxl import PROMPTS, diffusers_parts, diffusers_vector

UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer.text_model.encoder.layers."
TE2 = "conditioner.embedders.1.model.transformer.resblocks."
WIDTH_2 = 32  # the tiny bigG's width: q, k, v are rows [0:32], [32:64], [64:96] of in_proj_weight
HF_TO_OPEN_CLIP = {"self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj"}
QKV = ("q", "k", "v")


def te2_layer(name: str, block: int, prefix: str = TE2, width: int = WIDTH_2) -> tuple[str, slice | None]:
    """The checkpoint key and rows an HF-named OpenCLIP layer (`self_attn_q_proj`, `mlp_fc1`, ...) lives in."""
    if name.removeprefix("self_attn_").removesuffix("_proj") in QKV:
        part = QKV.index(name.removeprefix("self_attn_").removesuffix("_proj"))
        return f"{prefix}{block}.attn.in_proj_weight", slice(part * width, (part + 1) * width)
    return f"{prefix}{block}.{HF_TO_OPEN_CLIP[name]}.weight", None


TEXT_LAYERS = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",  # kohya: HF path
               "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
               "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}
LAYERS: dict[str, tuple[str, slice | None]] = {  # kohya name -> (checkpoint key, rows) of the weight it changes
    "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k":
        (UNET + "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight", None),
    "lora_unet_input_blocks_5_1_transformer_blocks_1_attn1_to_q":
        (UNET + "input_blocks.5.1.transformer_blocks.1.attn1.to_q.weight", None),
    # a diffusers block name, as in diffusers-trained SDXL LoRAs converted to kohya's format
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2":
        (UNET + "output_blocks.1.1.transformer_blocks.0.ff.net.2.weight", None),
    "lora_unet_input_blocks_1_0_in_layers_2": (UNET + "input_blocks.1.0.in_layers.2.weight", None),  # 3x3 (LoCon)
    "lora_unet_input_blocks_3_0_skip_connection": (UNET + "input_blocks.3.0.skip_connection.weight", None),  # 1x1
    **{f"lora_te1_text_model_encoder_layers_0_{name}": (f"{TE1}0.{path}.weight", None)
       for name, path in TEXT_LAYERS.items()},
    **{f"lora_te2_text_model_encoder_layers_1_{name}": te2_layer(name, 1) for name in TEXT_LAYERS},
}


def random_lora(state_dict: dict[str, torch.Tensor], layers: dict[str, tuple[str, slice | None]], seed: int = 3,
                scale: float = 0.5, mixed: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A kohya LoRA for `layers` (`mixed`: ranks 2 and 4, alphas 1, the rank, and none; else rank 2, alpha 1) and the
    change each makes to its checkpoint tensor at weight 1, computed here: alpha / rank * up @ down on the rows."""
    generator = torch.Generator().manual_seed(seed)
    lora, deltas = {}, {}
    for index, (name, (key, rows)) in enumerate(layers.items()):
        weight = state_dict[key] if rows is None else state_dict[key][rows]
        rank = 4 if mixed and index % 3 == 0 else 2
        down = torch.randn(rank, *weight.shape[1:], generator=generator)
        up = torch.randn(weight.shape[0], rank, *([1] * (weight.ndim - 2)), generator=generator) * scale
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
        alpha = (1.0, float(rank), None)[index % 3] if mixed else 1.0
        if alpha is not None:
            lora[f"{name}.alpha"] = torch.tensor(alpha)
        change = torch.einsum("or,ri...->oi...", up.flatten(1), down) * ((alpha or rank) / rank)
        delta = deltas.setdefault(key, torch.zeros_like(state_dict[key]))
        delta[slice(None) if rows is None else rows] += change
    return lora, deltas


def merged(state_dict: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], weight: float) -> dict:
    return {key: value + weight * deltas[key] if key in deltas else value for key, value in state_dict.items()}


@pytest.fixture(scope="module")
def checkpoints(tiny_xl_checkpoints) -> dict[str, Path]:
    return tiny_xl_checkpoints


@pytest.fixture(scope="module")
def base_state(checkpoints) -> dict[str, torch.Tensor]:
    return read_checkpoint(checkpoints["xl"])[0]


@pytest.fixture(scope="module")
def vocabulary(hf_vocabulary) -> Path:
    return hf_vocabulary


def load(checkpoints: dict[str, Path], family: str = "xl"):
    return load_model(checkpoints[family], TEST_CONFIGS / f"tiny-{family}.yaml")


def assert_state_equals(model, expected: dict[str, torch.Tensor], atol: float) -> None:
    state = model.state_dict()
    for key, value in expected.items():
        if key in state:
            torch.testing.assert_close(state[key], value, atol=atol, rtol=0, msg=key)


# --- (a) arithmetic --------------------------------------------------------------------------------------------------
def test_merged_weights_are_the_lora_arithmetic_on_the_checkpoint(checkpoints, base_state):
    model = load(checkpoints)
    lora, deltas = random_lora(base_state, LAYERS)
    assert apply_lora(model, lora, multiplier=0.7) == len(LAYERS)
    state = model.state_dict()
    expected = merged(base_state, deltas, 0.7)
    for key in state.keys() & base_state.keys():
        if key in deltas:
            torch.testing.assert_close(state[key], expected[key], atol=1e-6, rtol=0, msg=key)
            assert (state[key] - base_state[key]).abs().max() > 1e-2, key
        else:
            assert torch.equal(state[key], base_state[key]), key
    in_proj = state[TE2 + "1.attn.in_proj_weight"] - base_state[TE2 + "1.attn.in_proj_weight"]
    assert all(in_proj[rows].abs().max() > 1e-2 for rows in (slice(0, 32), slice(32, 64), slice(64, 96)))
    assert apply_lora(model, lora, multiplier=-0.7) == len(LAYERS)  # undo
    assert_state_equals(model, base_state, atol=1e-5)


def test_the_refiner_takes_its_bigg_encoder_as_lora_te(checkpoints):
    """The refiner has one text encoder (bigG, as embedders.0): kohya and ComfyUI call it lora_te_."""
    state_dict, _ = read_checkpoint(checkpoints["xl-refiner"])
    layers = {f"lora_te_text_model_encoder_layers_2_{name}": te2_layer(name, 2, "conditioner.embedders.0.model."
                                                                              "transformer.resblocks.")
              for name in TEXT_LAYERS}
    lora, deltas = random_lora(state_dict, layers)
    model = load(checkpoints, "xl-refiner")
    assert apply_lora(model, lora) == 6
    assert_state_equals(model, merged(state_dict, deltas, 1.0), atol=1e-6)
    with pytest.raises(LoraError, match=r"e\.g\. lora_te2_text_model_encoder_layers_2_mlp_fc1, .* \(lora_te2_ name "
                                        r"the text encoders of SDXL base; this model takes lora_te_ names\): is the "
                                        r"LoRA made for another base model\?$"):
        apply_lora(model, {key.replace("lora_te_", "lora_te2_"): value for key, value in lora.items()})


def test_sd2_takes_its_open_clip_encoder_as_lora_te(tiny_checkpoints):
    """SD 2.x's OpenCLIP ViT-H goes the same way as bigG: kohya trains SD 2.x on the Hugging Face layout too."""
    path = tiny_checkpoints["v2", ".ckpt"]
    state_dict, _ = read_checkpoint(path)
    width = state_dict["cond_stage_model.model.transformer.resblocks.0.attn.out_proj.weight"].shape[0]
    layers = {f"lora_te_text_model_encoder_layers_0_{name}": te2_layer(name, 0, "cond_stage_model.model.transformer."
                                                                              "resblocks.", width)
              for name in TEXT_LAYERS}
    lora, deltas = random_lora(state_dict, layers)
    model = load_model(path, TEST_CONFIGS / "tiny-v2.yaml")
    assert apply_lora(model, lora) == 6
    assert_state_equals(model, merged(state_dict, deltas, 1.0), atol=1e-6)


# --- (b) the conditioning and the UNet against transformers / diffusers -----------------------------------------------
@torch.no_grad()
def test_text_embeddings_equal_transformers_towers_with_the_lora_added_by_hand(checkpoints, base_state, vocabulary):
    """transformers' CLIP towers keep q, k, v apart under the LoRA's own names: adding each update to the layer it
    names, with no slicing, checks where ours lands in the fused in_proj."""
    lora, _ = random_lora(base_state, LAYERS, scale=0.1)  # updates of a LoRA's size keep activations near 1
    model = load(checkpoints)
    apply_lora(model, lora, multiplier=0.8)
    parts = diffusers_parts(checkpoints["xl"], "xl", vocabulary)
    towers = {"lora_te1_": parts["text_encoder"], "lora_te2_": parts["text_encoder_2"]}
    for prefix, tower in towers.items():
        layers = {path.removeprefix("text_model."): layer for path, layer in tower.named_modules()}
        for key, down in lora.items():
            if key.startswith(prefix) and key.endswith("lora_down.weight"):
                name = key.split(".")[0]
                block, layer = name.removeprefix(prefix + "text_model_encoder_layers_").split("_", 1)
                path = f"encoder.layers.{block}.{TEXT_LAYERS[layer]}"
                alpha = float(lora.get(f"{name}.alpha", down.shape[0]))
                layers[path].weight += 0.8 * alpha / down.shape[0] * lora[f"{name}.lora_up.weight"] @ down
    tokens = {prefix: parts[tokenizer](PROMPTS, padding="max_length", max_length=77, truncation=True,
                                       return_tensors="pt").input_ids
              for prefix, tokenizer in (("lora_te1_", "tokenizer"), ("lora_te2_", "tokenizer_2"))}
    hidden_1 = towers["lora_te1_"](tokens["lora_te1_"], output_hidden_states=True).hidden_states[-2]
    output_2 = towers["lora_te2_"](tokens["lora_te2_"], output_hidden_states=True)
    cond = model.get_learned_conditioning(PROMPTS)
    torch.testing.assert_close(cond["crossattn"], torch.cat([hidden_1, output_2.hidden_states[-2]], -1),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["vector"][:, :16], output_2.text_embeds, atol=1e-5, rtol=0)
    plain = load(checkpoints).get_learned_conditioning(PROMPTS)
    assert (plain["crossattn"][..., :32] - cond["crossattn"][..., :32]).abs().max() > 1e-2  # te1 changed it
    assert (plain["crossattn"][..., 32:] - cond["crossattn"][..., 32:]).abs().max() > 1e-2  # te2 too
    assert (plain["vector"][:, :16] - cond["vector"][:, :16]).abs().max() > 1e-2


@torch.no_grad()
def test_conditioning_and_unet_equal_diffusers_with_the_lora_fused(checkpoints, base_state, vocabulary):
    """diffusers converts kohya's SDXL names itself (its sgm block mapping, its te1/te2 split) and fuses with PEFT."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    sgm_named = {name: layer for name, layer in LAYERS.items() if "_up_blocks_" not in name}  # one naming per file
    # one rank and alpha: diffusers 0.42 misplaces per-module alphas of text-encoder modules in PEFT's alpha_pattern
    lora, _ = random_lora(base_state, sgm_named, scale=0.1, mixed=False)
    model = load(checkpoints)
    assert apply_lora(model, lora, multiplier=0.8) == len(sgm_named)
    pipe = StableDiffusionXLPipeline(**diffusers_parts(checkpoints["xl"], "xl", vocabulary),
                                     scheduler=EulerDiscreteScheduler())
    pipe.load_lora_weights(dict(lora))
    pipe.fuse_lora(lora_scale=0.8)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False)
    size = dict(original_size=(64, 64), crop_coords_top_left=(0, 0), target_size=(64, 64))
    cond = model.get_learned_conditioning(PROMPTS, **size)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=16)
    torch.testing.assert_close(cond["crossattn"], embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(cond["vector"], diffusers_vector(pipe.unet, pooled, time_ids.repeat(2, 1)),
                               atol=1e-5, rtol=0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([999, 400])
    expected = pipe.unet(latents, timesteps, encoder_hidden_states=cond["crossattn"], added_cond_kwargs=dict(
        text_embeds=cond["vector"][:, :16], time_ids=time_ids.repeat(2, 1))).sample
    torch.testing.assert_close(model.apply_model(latents, timesteps, cond), expected, atol=1e-5, rtol=0)
    plain = load(checkpoints)
    assert (plain.apply_model(latents, timesteps, cond) - expected).abs().max() > 1e-3  # the LoRA changed the UNet


# --- (c) txt2img --lora ----------------------------------------------------------------------------------------------
def run_txt2img(checkpoint: Path, outdir: Path, capsys, *flags: str) -> tuple[int, str, np.ndarray]:
    from ldm.cli.txt2img import main

    status = main(["--ckpt", str(checkpoint), "--config", str(TEST_CONFIGS / "tiny-xl.yaml"), "--prompt", PROMPTS[0],
                   "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--seed", "5",
                   "--sampler", "euler", "--precision", "full", "--outdir", str(outdir), "--skip_grid", "--no_metadata",
                   *flags])
    captured = capsys.readouterr()
    if status:
        return status, captured.err, np.zeros(0)
    with Image.open(outdir / "samples/00000.png") as image:
        return status, captured.out, np.asarray(image).astype(int)


def test_lora_flag_on_sdxl_gives_the_image_of_the_merged_checkpoint(checkpoints, base_state, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lora, deltas = random_lora(base_state, LAYERS, scale=2.0)
    write_checkpoint(lora, tmp_path / "style.safetensors")
    write_checkpoint(merged(base_state, deltas, 0.5), tmp_path / "merged.safetensors")
    status, out, with_lora = run_txt2img(checkpoints["xl"], tmp_path / "lora", capsys,
                                         "--lora", f"{tmp_path / 'style.safetensors'}:0.5")
    assert status == 0 and f"style.safetensors: {len(LAYERS)} layers, weight 0.5" in out
    status, _, merged_image = run_txt2img(tmp_path / "merged.safetensors", tmp_path / "merged", capsys)
    assert status == 0 and np.abs(with_lora - merged_image).max() <= 1
    _, _, base = run_txt2img(checkpoints["xl"], tmp_path / "base", capsys)
    assert np.abs(with_lora - base).max() > 10  # the LoRA did change the image


# --- (d) LoRAs for the other family ----------------------------------------------------------------------------------
def test_an_sd1_lora_on_sdxl_fails_with_one_line(checkpoints, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_sd1_lora(tmp_path / "sd1.safetensors", read_checkpoint(tiny_checkpoint)[0])
    status, err, _ = run_txt2img(checkpoints["xl"], tmp_path / "out", capsys, "--lora",
                                 str(tmp_path / "sd1.safetensors"))
    assert status == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert ("module(s) do not exist in this model, e.g. lora_te_text_model_encoder_layers_0_self_attn_q_proj, "
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q (lora_te_ name the text encoders of SD "
            "1.x/2.x or the SDXL refiner; this model takes lora_te1_/lora_te2_ names): is the LoRA made for another "
            "base model?") in err


def test_an_sdxl_lora_on_sd1_fails_and_changes_nothing(tiny_checkpoint, tiny_config, base_state):
    model = load_model(tiny_checkpoint, tiny_config)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    lora, _ = random_lora(base_state, LAYERS)
    with pytest.raises(LoraError, match=r"\(lora_te1_/lora_te2_ name the text encoders of SDXL base; this model "
                                        r"takes lora_te_ names\): is the LoRA made for another base model\?$"):
        apply_lora(model, lora)
    unet_only = {key: value for key, value in lora.items() if key.startswith("lora_unet_input_blocks_5_1_")}
    with pytest.raises(LoraError, match="do not exist in this model, e.g. lora_unet_input_blocks_5_1_transformer_"
                                        "blocks_1_attn1_to_q: is the LoRA made for another base model"):
        apply_lora(model, unet_only)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
