"""Training (`main.py`): short runs on the tiny config lower the loss, write checkpoints the loader and the CLI read,
resume where they stopped, and train LoRAs that change the model and load back; plus the pieces they are made of."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("lightning", reason="training needs the train extra (PyTorch Lightning)")

from checkpoint_factory import TEST_CONFIGS  # noqa: E402
from ldm.checkpoints import read_checkpoint  # noqa: E402
from ldm.data.folder import CaptionedImageFolder  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.lora import LoraError, apply_lora  # noqa: E402
from ldm.training.cli import main as train_main  # noqa: E402
from ldm.training.ema import LitEma  # noqa: E402
from ldm.training.lora import LoraNetwork, unet_targets  # noqa: E402
from ldm.training.objectives import diffusion_target, drop_captions  # noqa: E402

TINY = TEST_CONFIGS / "tiny-v1.yaml"
FINETUNE = Path(__file__).resolve().parent.parent / "configs" / "finetune" / "lora-folder.yaml"
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_training_config(folder: Path, training: dict, max_steps: int, batch_size: int = 4, length: int = 8) -> Path:
    """A training config to merge over tiny-v1.yaml: 64x64 shapes (the tiny autoencoder is f=8, 8x8 latents)."""
    config = {
        "data": {"params": {"batch_size": batch_size, "num_workers": 0, "train": {
            "target": "ldm.data.shapes.ShapesDataset", "params": {"size": 64, "length": length, "seed": 0}}}},
        "training": {"checkpoint_every_n_steps": 0, **training},
        "lightning": {"trainer": {"max_steps": max_steps, "enable_progress_bar": False,
                                  "enable_model_summary": False}},
    }
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evaluation_loss(model: torch.nn.Module, seed: int = 0) -> float:
    """The v1 objective (eps MSE) on fixed shapes latents, timesteps and noise: a number two models can compare."""
    from ldm.data.shapes import ShapesDataset
    from ldm.training.objectives import diffusion_loss

    images = torch.stack([ShapesDataset(size=64, length=8, seed=0)[i]["image"] for i in range(8)])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = model.get_first_stage_encoding(model.encode_first_stage(images), generator=generator)
        cond = model.get_learned_conditioning([PROMPTS[i % 2] for i in range(8)])
        return sum(float(diffusion_loss(model, latents, cond, generator)) for _ in range(8)) / 8


def model_output(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([10, 700]), model.get_learned_conditioning(PROMPTS))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_checkpoint) -> dict:
    """A 40-step fine-tune of the tiny checkpoint with EMA, then resumed to 44 steps."""
    folder = tmp_path_factory.mktemp("run")
    config = write_training_config(folder, {"ema_decay": 0.9, "cache_latents": True, "ucg_rate": 0.1,
                                            "init_from": str(tiny_checkpoint)}, max_steps=40)
    status = train_main(["--base", str(TINY), str(config), "-t", "--logdir", str(folder), "--name", "run",
                         "model.base_learning_rate=1e-3"])
    first = read_checkpoint(folder / "run" / "checkpoints" / "last.ckpt")
    resumed = train_main(["--resume", str(folder / "run"), "-t", "--max_steps", "44"])
    return {"status": (status, resumed), "run": folder / "run", "first_extras": first[1],
            "base": tiny_checkpoint}


def test_short_run_lowers_the_loss(trained_run):
    assert trained_run["status"] == (0, 0)
    before = evaluation_loss(load_model(trained_run["base"], TINY))
    after = evaluation_loss(load_model(trained_run["run"] / "checkpoints" / "last.safetensors", TINY))
    print(f"evaluation loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before


def test_checkpoints_load_with_the_released_layout_and_ema(trained_run):
    checkpoints = trained_run["run"] / "checkpoints"
    state, extras = read_checkpoint(checkpoints / "last.ckpt")
    exported, _ = read_checkpoint(checkpoints / "last.safetensors")
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert not any(key.startswith(("ldm.", "lora.")) for key in state)
    # the export holds the EMA weights in place: they are the ckpt's CompVis-named shadows, not the trained ones
    name = "model.diffusion_model.out.2.weight"
    assert torch.equal(exported[name], state["model_ema.diffusion_modelout2weight"])
    assert not torch.equal(exported[name], state[name])
    assert not any(key.startswith("model_ema.") for key in exported)
    raw = load_model(checkpoints / "last.ckpt", TINY)
    ema = load_model(checkpoints / "last.ckpt", TINY, use_ema=True)
    assert torch.equal(ema.model.diffusion_model.out[2].weight, exported[name])
    assert torch.equal(raw.model.diffusion_model.out[2].weight, state[name])


def test_resume_continues_the_step_count(trained_run):
    _, extras = read_checkpoint(trained_run["run"] / "checkpoints" / "last.ckpt")
    assert trained_run["first_extras"]["global_step"] == 40
    assert extras["global_step"] == 44
    assert len(list((trained_run["run"] / "csv").iterdir())) == 2  # one log per session, none overwritten


def test_txt2img_samples_from_the_trained_checkpoint(trained_run, tmp_path):
    from ldm.cli.txt2img import main as txt2img_main

    status = txt2img_main(["--ckpt", str(trained_run["run"] / "checkpoints" / "last.safetensors"), "--config",
                           str(TINY), "--H", "64", "--W", "64", "--n_samples", "1", "--n_iter", "1",
                           "--ddim_steps", "4", "--outdir", str(tmp_path), "--prompt", PROMPTS[0]])
    assert status == 0
    [sample] = (tmp_path / "samples").glob("*.png")
    assert Image.open(sample).size == (64, 64)


def test_lora_trains_changes_outputs_and_loads_back(tmp_path, tiny_checkpoint):
    config = write_training_config(tmp_path, {"init_from": str(tiny_checkpoint), "ucg_rate": 0.0,
                                              "lora": {"rank": 4, "alpha": 2, "text_encoder": True}}, max_steps=3)
    assert train_main(["--base", str(TINY), str(config), "-t", "--logdir", str(tmp_path), "--name", "lora",
                       "model.base_learning_rate=1e-2"]) == 0
    lora, _ = read_checkpoint(tmp_path / "lora" / "checkpoints" / "last.safetensors")
    for key in ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_middle_block_1_proj_in.lora_up.weight",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight"):
        assert key in lora
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in lora)
    assert lora["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape == (4, 32)
    assert float(lora["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 2.0
    ckpt_state, _ = read_checkpoint(tmp_path / "lora" / "checkpoints" / "last.ckpt")
    assert set(ckpt_state) == set(lora)  # the resumable checkpoint holds the adapters, not the base model

    base = load_model(tiny_checkpoint, TINY)
    reference = model_output(base)
    # hooks (as trained) and merged weights (as applied at inference) compute the same model
    hooked = LoraNetwork(base.model.diffusion_model, base.cond_stage_model, rank=4, alpha=2)
    hooked.adapters.load_state_dict({key: value for key, value in lora.items()})
    with_hooks = model_output(base)
    hooked.remove()
    assert torch.equal(model_output(base), reference)
    assert apply_lora(base, tmp_path / "lora" / "checkpoints" / "last.safetensors", multiplier=1.0) == len(
        {key.split(".")[0] for key in lora})
    merged = model_output(base)
    assert (merged - reference).abs().max() > 1e-3
    torch.testing.assert_close(merged, with_hooks, atol=1e-5, rtol=1e-4)
    apply_lora(base, lora, multiplier=-1.0)  # undoes the merge
    torch.testing.assert_close(model_output(base), reference, atol=1e-5, rtol=1e-4)


def test_lora_merge_arithmetic_and_refusals(tiny_checkpoint):
    model = load_model(tiny_checkpoint, TINY)
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    before = layer.weight.clone()
    down, up = torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    apply_lora(model, {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                       f"{name}.alpha": torch.tensor(1.0)}, multiplier=0.5)
    torch.testing.assert_close(layer.weight, before + 0.5 * (1.0 / 2) * up @ down)
    with pytest.raises(LoraError, match="do not exist"):
        apply_lora(model, {"lora_unet_no_such_layer.lora_down.weight": down,
                           "lora_unet_no_such_layer.lora_up.weight": up})
    with pytest.raises(LoraError, match="do not fit"):
        apply_lora(model, {f"{name}.lora_down.weight": torch.randn(2, 7), f"{name}.lora_up.weight": up})
    with pytest.raises(LoraError, match="not kohya LoRA"):
        apply_lora(model, {"lora_unet_x.hada_w1_a": down})
    torch.testing.assert_close(layer.weight, before + 0.25 * up @ down)  # refused files change nothing


def test_autoencoder_training_writes_a_vae_file_the_loader_takes(tmp_path, tiny_checkpoint):
    config = write_training_config(tmp_path, {}, max_steps=2, batch_size=2, length=4)
    autoencoder = yaml.safe_load(TINY.read_text())["model"]["params"]["first_stage_config"]
    autoencoder["params"]["lossconfig"] = {"target": "ldm.training.autoencoder.ReconstructionKLLoss"}
    vae_config = tmp_path / "vae.yaml"
    vae_config.write_text(yaml.safe_dump({"model": {"base_learning_rate": 1e-4, **autoencoder}}))
    assert train_main(["--base", str(vae_config), str(config), "-t", "--logdir", str(tmp_path), "--name", "vae"]) == 0
    vae, _ = read_checkpoint(tmp_path / "vae" / "checkpoints" / "last.safetensors")
    assert "decoder.conv_out.weight" in vae and "encoder.conv_in.weight" in vae
    model = load_model(tiny_checkpoint, TINY, vae=tmp_path / "vae" / "checkpoints" / "last.safetensors")
    assert torch.equal(model.first_stage_model.decoder.conv_out.weight, vae["decoder.conv_out.weight"])


def test_main_refuses_bad_input_before_training(tmp_path, capsys, trained_run):
    assert train_main(["--base", str(TINY)]) == 2
    assert "pass -t" in capsys.readouterr().err
    assert train_main(["--resume", str(tmp_path / "nothing"), "-t"]) == 2
    assert train_main(["--base", str(TINY), "-t", "max_steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    taken = trained_run["run"]
    assert train_main(["--base", str(TINY), "-t", "--logdir", str(taken.parent), "--name", taken.name,
                       "lightning.trainer.max_steps=1", "data.params.batch_size=1",
                       "data.params.train.target=ldm.data.shapes.ShapesDataset"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert train_main(["--base", str(TINY), "-t", "--logdir", str(tmp_path)]) == 2  # no data, no max_steps
    assert "has no" in capsys.readouterr().err


def test_ema_warm_up_matches_compvis():
    parameter = torch.nn.Parameter(torch.zeros(3))
    ema = LitEma({"diffusion_model.w": parameter}, decay=0.9999)
    assert "diffusion_modelw" in dict(ema.named_buffers())
    with torch.no_grad():
        parameter.fill_(1.0)
    ema.update({"diffusion_model.w": parameter})
    decay = min(0.9999, (1 + 1) / (10 + 1))
    torch.testing.assert_close(ema.shadow("diffusion_model.w"), torch.full((3,), 1 - decay))
    with ema.average_parameters({"diffusion_model.w": parameter}):
        torch.testing.assert_close(parameter.detach(), torch.full((3,), 1 - decay))
    assert torch.equal(parameter.detach(), torch.ones(3))


def test_v_target_matches_diffusers_velocity(tiny_checkpoint):
    from diffusers import DDPMScheduler

    model = load_model(tiny_checkpoint, TINY)
    model.parameterization = "v"
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(diffusion_target(model, x0, noise, t), scheduler.get_velocity(x0, noise, t),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=1e-4)
    model.parameterization = "eps"
    assert torch.equal(diffusion_target(model, x0, noise, t), noise)


def test_min_snr_weights_match_the_paper_with_diffusers_snr(tiny_checkpoint):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from ldm.training.objectives import min_snr_weight

    model = load_model(tiny_checkpoint, TINY)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000)
    t = torch.tensor([0, 100, 400, 700, 999])
    snr = compute_snr(scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    for parameterization, expected in (("eps", clipped / snr), ("v", clipped / (snr + 1)), ("x0", clipped)):
        model.parameterization = parameterization
        torch.testing.assert_close(min_snr_weight(model, t, 5.0), expected, atol=1e-6, rtol=1e-4)


def test_training_settings_refuse_unknown_and_bad_values():
    from ldm.training.settings import TrainingSettings

    assert TrainingSettings.from_config({"lora": {"rank": 8}}).lora.rank == 8
    with pytest.raises(ValueError, match="unknown training settings \\['ema'\\].*ema_decay"):
        TrainingSettings.from_config({"ema": 0.9})
    with pytest.raises(ValueError, match="ucg_rate 1.5"):
        TrainingSettings.from_config({"ucg_rate": 1.5})
    with pytest.raises(ValueError, match="rank must be at least 1"):
        TrainingSettings.from_config({"lora": {"rank": 0}})


def test_caption_dropout_rate_and_determinism():
    captions = [f"caption {i}" for i in range(4000)]
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    share = sum(caption == "" for caption in dropped) / len(captions)
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(captions))
    assert dropped == drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert all(a == b for a, b in zip(dropped, captions) if a)
    assert drop_captions(captions[:5], 0.0, torch.Generator()) == captions[:5]


def test_captioned_image_folder(tmp_path):
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a  red\nbanner\n")
    Image.new("RGB", (30, 60), (0, 0, 255)).save(tmp_path / "tall.jpg")
    with pytest.raises(ValueError, match="tall.jpg"):
        CaptionedImageFolder(tmp_path, size=16)
    data = CaptionedImageFolder(tmp_path, size=16, default_caption="a photo", repeats=2)
    assert len(data) == 4
    item = data[1]
    assert item["caption"] == "a red banner" and item["image"].shape == (3, 16, 16) and item["index"] == 1
    torch.testing.assert_close(item["image"][:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert data[0]["caption"] == "a photo"


def test_finetune_config_trains_a_lora_on_an_image_folder(tmp_path, tiny_checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (80, 64), colour).save(photos / f"{index}.png")
        (photos / f"{index}.txt").write_text(f"a photo of sks {index}")
    base = ["--base", str(TINY), str(FINETUNE), "-t", "--logdir", str(tmp_path)]
    assert train_main(base + [f"training.init_from={tiny_checkpoint}"]) == 2
    assert "data.params.train.params.root" in capsys.readouterr().err
    assert train_main(base + ["--name", "ft", f"training.init_from={tiny_checkpoint}",
                              f"data.params.train.params.root={photos}", "data.params.train.params.size=64",
                              "data.params.num_workers=0", "lightning.trainer.max_steps=2",
                              "lightning.trainer.accumulate_grad_batches=1",
                              "lightning.trainer.enable_progress_bar=false"]) == 0
    lora, _ = read_checkpoint(tmp_path / "ft" / "checkpoints" / "last.safetensors")
    assert lora and all(key.startswith("lora_unet_") for key in lora)
    assert lora["lora_unet_middle_block_1_proj_in.lora_down.weight"].dtype == torch.float16
    assert lora["lora_unet_middle_block_1_proj_in.lora_down.weight"].shape[0] == 8
    apply_lora(load_model(tiny_checkpoint, TINY), tmp_path / "ft" / "checkpoints" / "last.safetensors")


def test_inference_path_does_not_import_lightning():
    import subprocess
    import sys

    code = ("import sys, ldm.loading, ldm.lora, ldm.cli.txt2img, ldm.models.diffusion.samplers, ldm.data.shapes; "
            "print(sorted(m for m in sys.modules if m.startswith(('lightning', 'pytorch_lightning', 'ldm.training'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_diffusers_style_kohya_names_address_the_same_layers(tiny_checkpoint):
    """Kohya's SD 1.x files name attention blocks as diffusers does; diffusers' own LDM converter is the reference
    for which diffusers module each UNet layer becomes."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     create_unet_diffusers_config_from_ldm)

    from ldm.diffusers_names import UNetLayout
    from ldm.lora import UNET_PREFIX, ldm_module_name, lora_targets

    state, _ = read_checkpoint(tiny_checkpoint)
    converted = convert_ldm_unet_checkpoint(state, create_unet_diffusers_config_from_ldm(
        yaml.safe_load(TINY.read_text()), state))
    model = load_model(tiny_checkpoint, TINY)
    targets = lora_targets(model)
    layout = UNetLayout.from_unet(model.model.diffusion_model)
    mapped = set()
    for key, tensor in converted.items():
        if "attentions" in key and key.endswith(".weight") and tensor.ndim >= 2:
            name = ldm_module_name(UNET_PREFIX + key.removesuffix(".weight").replace(".", "_"), layout)
            assert torch.equal(targets[name].weight, tensor), key
            mapped.add(name)
    # every layer a kohya LoRA adapts in the attention blocks, none missing
    assert mapped == {name for name, _ in unet_targets(model.model.diffusion_model)}
