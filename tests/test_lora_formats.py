"""LoRA files in the formats few-step LoRAs come in, against diffusers loading the same file into the same weights:
PEFT's names as diffusers' `save_lora_weights` writes them (`unet.*.lora_A.weight`, with PEFT's `lora_alpha` and
`alpha_pattern` in the safetensors metadata), diffusers' older `lora.down` / `lora_linear_layer.down` names, and
kohya's names with diffusers' blocks (`lora_unet_down_blocks_0_resnets_0_conv1`, `lora_down` / `lora_up` / `alpha`:
LCM-LoRA's format). Every kind of layer these LoRAs adapt is covered: attention projections, proj_in/out, the
feed-forward, res-block convolutions, shortcuts and time projections, down/upsamplers, conv_in/out, the time and
(SDXL) added-condition embeddings, and both text encoders. Then an LCM-LoRA run end to end: the LCM sampler on the
LCM schedule against diffusers' LCMScheduler, same weights and noise."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from checkpoint_factory import TEST_CONFIGS
from ldm.loading import load_model
from ldm.lora import LoraError, apply_lora
from ldm.models.diffusion.noise import ImageNoise
from ldm.pipeline import Loras, Pipeline, Request
from reference_sd import PROMPT, diffusers_pipeline
from reference_sdxl import PROMPTS, diffusers_parts, diffusers_vector

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

# what LCM-LoRA's training script adapts (diffusers' train_lcm_distill_lora_*), and the time and added-condition
# embeddings, conv_in and conv_out besides
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj", "linear_1",
                "linear_2", "conv_in", "conv_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RANK, ALPHA, ALPHA_PATTERN = 4, 8.0, {"to_k": 2.0, "fc2": 1.0}


def targets(module: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """The layers PEFT's `target_modules` would pick: names ending in one of `suffixes`; a text encoder's under
    `text_model.`, as LoRA files name them (transformers 5's CLIPTextModel no longer has that level)."""
    text = isinstance(module, transformers.PreTrainedModel) and not hasattr(module, "text_model")
    return {f"text_model.{name}" if text else name: layer for name, layer in module.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)}


def random_peft_lora(components: dict[str, torch.nn.Module], seed: int = 0) -> dict[str, torch.Tensor]:
    """A PEFT-format LoRA of rank RANK on every target layer of each diffusers component, small enough to keep the
    activations near their size (A: the layer's input shape, B: [out, rank] / 1x1)."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for component, module in components.items():
        for name, layer in targets(module, TEXT_TARGETS if component.startswith("text") else UNET_TARGETS).items():
            shape = layer.weight.shape
            lora[f"{component}.{name}.lora_A.weight"] = torch.randn(RANK, *shape[1:], generator=generator) * 0.3
            lora[f"{component}.{name}.lora_B.weight"] = torch.randn(shape[0], RANK, *([1] * (len(shape) - 2)),
                                                                    generator=generator) * 0.3 / shape[1] ** 0.5
    return lora


def metadata(components: list[str]) -> dict[str, str]:
    """diffusers' adapter metadata: PEFT's LoraConfig per component (alpha 8 on rank 4; to_k and fc2 otherwise)."""
    from peft import LoraConfig

    packed = {}
    for component in components:
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, alpha_pattern=ALPHA_PATTERN, target_modules=list(
            TEXT_TARGETS if component.startswith("text") else UNET_TARGETS)).to_dict()
        packed.update({f"{component}.{key}": sorted(value) if isinstance(value, set) else value
                       for key, value in config.items()})
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)}


def as_kohya(lora: dict[str, torch.Tensor], text_prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The same tensors in kohya's names with diffusers' blocks, lora_down / lora_up / alpha (LCM-LoRA's format). One
    alpha for all: diffusers 0.42 misplaces differing kohya alphas when it turns them into PEFT's alpha_pattern
    (measured: 84% off on the UNet), so per-module alphas are compared in the PEFT form, whose metadata it reads
    right, and against the arithmetic in test_lora_sdxl."""
    prefixes = {"unet": "lora_unet_", **text_prefixes}
    kohya = {}
    for key, tensor in lora.items():
        component, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        name = prefixes[component] + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(ALPHA)
    return kohya


def as_old_diffusers(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors in diffusers' pre-PEFT names (`lora.down`, the text encoders' `lora_linear_layer.down`);
    no alphas (diffusers refuses `.alpha` keys in this form), so alpha is the rank."""
    old = {}
    for key, tensor in lora.items():
        module, part = key.rsplit(".lora_", 1)
        layer = "lora_linear_layer" if key.startswith("text") else "lora"
        old[f"{module}.{layer}.{'down' if part.startswith('A') else 'up'}.weight"] = tensor
    return old


def write(tmp_path: Path, name: str, lora: dict[str, torch.Tensor], extra: dict[str, str] | None = None) -> Path:
    path = tmp_path / name
    save_file({key: tensor.contiguous() for key, tensor in lora.items()}, str(path), metadata=extra)
    return path


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


# --- SD 1.x -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd1_lora(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The same random LoRA for the tiny SD 1.x model in each format: {format: file}."""
    folder = tmp_path_factory.mktemp("sd1-lora")
    pipe = diffusers_pipeline(tiny_checkpoint, folder, diffusers.DDIMScheduler())
    lora = random_peft_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    return {"peft": write(folder, "peft.safetensors", lora, metadata(["unet", "text_encoder"])),
            "kohya": write(folder, "lcm-lora-tiny.safetensors", as_kohya(lora, {"text_encoder": "lora_te_"})),
            "diffusers": write(folder, "old.safetensors", as_old_diffusers(lora))}


@pytest.mark.parametrize("form", ["peft", "kohya", "diffusers"])
@torch.no_grad()
def test_sd1_lora_matches_diffusers(form, sd1_lora, tiny_checkpoint, tmp_path):
    model = load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml")
    plain_cond = model.get_learned_conditioning([PROMPT])
    layers = apply_lora(model, sd1_lora[form], multiplier=0.8)
    pipe = diffusers_pipeline(tiny_checkpoint, tmp_path, diffusers.DDIMScheduler())
    assert layers == len(targets(pipe.unet, UNET_TARGETS)) + len(targets(pipe.text_encoder, TEXT_TARGETS))
    pipe.load_lora_weights(str(sd1_lora[form]))
    pipe.fuse_lora(lora_scale=0.8)

    cond = model.get_learned_conditioning([PROMPT])
    expected_cond, _ = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)
    assert relative_error(cond, expected_cond) < 1e-5
    assert relative_error(plain_cond, expected_cond) > 1e-2  # the text encoder's LoRA did change it

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps, context = torch.tensor([999, 250]), cond.repeat(2, 1, 1)
    expected = pipe.unet(latents, timesteps, encoder_hidden_states=context).sample
    assert relative_error(model.apply_model(latents, timesteps, context), expected) < 1e-5
    plain = load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml").apply_model(latents, timesteps, context)
    assert relative_error(plain, expected) > 1e-2  # the UNet's LoRA did change it


def test_metadata_alphas_are_read_and_damaged_metadata_refused(sd1_lora, tiny_checkpoint, tmp_path):
    from ldm.lora import read_lora

    lora = read_lora(sd1_lora["peft"])
    assert float(lora["unet.down_blocks.0.attentions.0.proj_in.alpha"]) == ALPHA
    assert float(lora["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.alpha"]) == 2.0
    assert float(lora["text_encoder.text_model.encoder.layers.0.mlp.fc2.alpha"]) == 1.0
    tensors = {key: value for key, value in lora.items() if not key.endswith(".alpha")}
    damaged = write(tmp_path, "damaged.safetensors", tensors, {"lora_adapter_metadata": "{not json"})
    model = load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml")
    with pytest.raises(LoraError, match="lora_adapter_metadata is not readable JSON"):
        apply_lora(model, damaged)
    crafted = {"unet.lora_alpha": "many", "unet.alpha_pattern": {"(a+)+$": 1.0}}
    damaged = write(tmp_path, "damaged.safetensors", tensors, {"lora_adapter_metadata": json.dumps(crafted)})
    with pytest.raises(LoraError, match="an alpha in its lora_adapter_metadata is not a number"):
        apply_lora(model, damaged)  # and the pattern key is a name, never run as a regular expression


def test_diffusers_names_without_a_counterpart_are_named(tiny_checkpoint):
    model = load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml")
    lora = {"unet.time_embedding.cond_proj.lora_A.weight": torch.zeros(2, 8),
            "unet.time_embedding.cond_proj.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(LoraError, match="lora_unet_time_embedding_cond_proj .*such as an LCM's guidance embedding"):
        apply_lora(model, lora)


# --- SDXL ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["peft", "kohya"])
@torch.no_grad()
def test_sdxl_lora_matches_diffusers(form, tiny_xl_checkpoints, hf_vocabulary, tmp_path):
    checkpoint = tiny_xl_checkpoints["xl"]
    parts = diffusers_parts(checkpoint, "xl", hf_vocabulary)
    components = {"unet": parts["unet"], "text_encoder": parts["text_encoder"],
                  "text_encoder_2": parts["text_encoder_2"]}
    lora = random_peft_lora(components, seed=1)
    if form == "peft":
        path = write(tmp_path, "lora.safetensors", lora, metadata(list(components)))
    else:  # diffusers' kohya reader turns lora_unet_add_embedding_linear_1 into add.embedding.linear: left out
        lora = {key: tensor for key, tensor in lora.items() if not key.startswith("unet.add_embedding.")}
        path = write(tmp_path, "lora.safetensors",
                     as_kohya(lora, {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}))
    model = load_model(checkpoint, TEST_CONFIGS / "tiny-xl.yaml")
    assert apply_lora(model, path) == len(lora) // 2
    assert form == "kohya" or any(key.startswith("unet.add_embedding.linear_1") for key in lora)
    pipe = diffusers.StableDiffusionXLPipeline(**parts, scheduler=diffusers.EulerDiscreteScheduler())
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()

    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False)
    size = {"original_size": (64, 64), "crop_coords_top_left": (0, 0), "target_size": (64, 64)}
    cond = model.get_learned_conditioning(PROMPTS, **size)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32,
                                      text_encoder_projection_dim=16).repeat(2, 1)
    assert relative_error(cond["crossattn"], embeds) < 1e-5
    assert relative_error(cond["vector"], diffusers_vector(pipe.unet, pooled, time_ids)) < 1e-5
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([999, 400])
    expected = pipe.unet(latents, timesteps, encoder_hidden_states=cond["crossattn"], added_cond_kwargs={
        "text_embeds": cond["vector"][:, :16], "time_ids": time_ids}).sample
    assert relative_error(model.apply_model(latents, timesteps, cond), expected) < 1e-5


# --- an LCM-LoRA run, end to end ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_lcm_lora_run_matches_diffusers_lcm_scheduler(sd1_lora, tiny_checkpoint, tmp_path):
    """The LCM-LoRA preset's settings (LCM sampler, LCM schedule, 4 steps, scale 1) through the pipeline, against
    diffusers' pipeline with LCMScheduler and the same LoRA file, starting latents and step noise."""
    from ldm.pipeline.presets import few_step_preset

    preset = few_step_preset(tiny_checkpoint, [sd1_lora["kohya"]])
    assert preset.request_fields() == {"sampler": "lcm", "scheduler": "LCM", "steps": 4, "scale": 1.0}
    pipeline = Pipeline.from_checkpoint(str(tiny_checkpoint), config=str(TEST_CONFIGS / "tiny-v1.yaml"),
                                        device="cpu", addons=[Loras([(str(sd1_lora["kohya"]), 1.0)])])
    result = pipeline(Request(PROMPT, seeds=[3, 4], height=64, width=64, **preset.request_fields()))

    pipe = diffusers_pipeline(tiny_checkpoint, tmp_path, diffusers.LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    pipe.load_lora_weights(str(sd1_lora["kohya"]))
    pipe.fuse_lora()
    noise = ImageNoise([3, 4])
    sigma_max = float(pipeline.schedule.sigma_max)
    x_T = noise.randn((2, 4, 8, 8)) * sigma_max / (sigma_max**2 + 1) ** 0.5  # ours, in diffusers' variable
    expected = pipe(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=1.0, num_images_per_prompt=2,
                    latents=x_T, generator=noise.generators, output_type="latent").images
    assert expected.abs().max() > 0.1
    assert relative_error(result.latents, expected) < 1e-4
