"""The strict loader: formats told by bytes, safe unpickling, key checks with actionable messages, EMA, no init."""
from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from checkpoint_factory import TEST_CONFIGS, random_state_dict, write_checkpoint
from ldm.checkpoints import detect_format, read_checkpoint, model_hash
from ldm.loading import CONFIG_DIR, LoadError, load_model, parameters_on_meta, resolve_config
from ldm.util import instantiate_from_config
from pickle_payload import Payload

V1, V2 = TEST_CONFIGS / "tiny-v1.yaml", TEST_CONFIGS / "tiny-v2.yaml"


def real_size_shapes(config_name: str) -> dict[str, tuple[int, ...]]:
    config = OmegaConf.load(str(CONFIG_DIR / config_name))
    with parameters_on_meta():
        model = instantiate_from_config(config.model)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_ckpt_and_safetensors_load_the_same_weights(tiny_checkpoints, family):
    config = TEST_CONFIGS / f"tiny-{family}.yaml"
    expected, _ = read_checkpoint(tiny_checkpoints[family, ".ckpt"])
    outputs = []
    for suffix in (".ckpt", ".safetensors"):
        model = load_model(tiny_checkpoints[family, suffix], config)
        state = model.state_dict()
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
        with torch.no_grad():
            cond = model.get_learned_conditioning(["a red circle", "a blue square"])
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            eps = model.apply_model(x, torch.tensor([999, 10]), cond)
            image = model.decode_first_stage(x)
        assert cond.shape == (2, 77, 32) and eps.shape == x.shape and image.shape == (2, 3, 64, 64)
        assert torch.isfinite(eps).all() and eps.abs().mean() > 0.01
        outputs.append((cond, eps, image))
    for first, second in zip(*outputs):
        assert torch.equal(first, second)


def test_format_comes_from_bytes_not_extension(tiny_checkpoints, tmp_path):
    safetensors_as_ckpt = shutil.copy(tiny_checkpoints["v1", ".safetensors"], tmp_path / "model.ckpt")
    ckpt_as_safetensors = shutil.copy(tiny_checkpoints["v1", ".ckpt"], tmp_path / "model.safetensors")
    assert detect_format(safetensors_as_ckpt) == "safetensors"
    assert detect_format(ckpt_as_safetensors) == "torch-zip"
    first = load_model(safetensors_as_ckpt, V1).state_dict()
    second = load_model(ckpt_as_safetensors, V1).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    Payload.marker = str(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(LoadError, match="could run code"):
        load_model(path, V1)
    assert not marker.exists()


def test_lightning_extras_with_numpy_and_callback_records_load(tmp_path):
    """Released Lightning files carry numpy scalars and a ModelCheckpoint record; those are harmless."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:  # pickled by reference, rebuilt as an inert stand-in
        pass

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module.__name__]
    for name in names[:2]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    try:
        state_dict = random_state_dict(V1)
        torch.save({"state_dict": state_dict, "global_step": 470000,
                    "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25), "monitor": "val/loss"}}},
                   tmp_path / "lightning.ckpt")
    finally:
        for name in names:
            sys.modules.pop(name, None)
    model = load_model(tmp_path / "lightning.ckpt", V1)
    assert torch.equal(model.state_dict()["model.diffusion_model.out.2.weight"],
                       state_dict["model.diffusion_model.out.2.weight"])


@pytest.mark.parametrize("family, config, advice", [
    ("v2", V1, "SD 2.x checkpoint: use configs/stable-diffusion/v2-inference.yaml"),
    ("v1", V2, "SD 1.x checkpoint: use configs/stable-diffusion/v1-inference.yaml"),
])
def test_mismatched_config_names_keys_and_says_what_to_do(tiny_checkpoints, family, config, advice):
    with pytest.raises(LoadError) as error:
        load_model(tiny_checkpoints[family, ".ckpt"], config)
    message = str(error.value)
    assert advice in message and "missing" in message and "\n" not in message


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    state_dict = random_state_dict(V1)
    del state_dict["model.diffusion_model.out.2.bias"]
    state_dict["model.diffusion_model.extra.weight"] = torch.zeros(3)
    state_dict["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(LoadError) as error:
        load_model(write_checkpoint(state_dict, tmp_path / "broken.safetensors"), V1)
    message = str(error.value)
    assert "1 missing (model.diffusion_model.out.2.bias)" in message
    assert "1 unexpected (model.diffusion_model.extra.weight)" in message
    assert "first_stage_model.quant_conv.weight [8, 8, 3, 3] vs [8, 8, 1, 1]" in message


def test_harmless_keys_are_allowed_and_schedule_buffers_optional(tmp_path):
    state_dict = random_state_dict(V1)
    state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state_dict["model_ema.decay"] = torch.tensor(0.9999)
    del state_dict["alphas_cumprod"], state_dict["betas"]
    model = load_model(write_checkpoint(state_dict, tmp_path / "m.ckpt"), V1)
    reference = random_state_dict(V1)["alphas_cumprod"]
    assert torch.equal(model.alphas_cumprod, reference)


def test_ema_weights_are_used_when_asked(tmp_path):
    state_dict = random_state_dict(V1)
    unet_keys = [key for key in state_dict if key.startswith("model.diffusion_model.")]
    for key in unet_keys:  # LitEma names the shadow copies with the dots removed
        state_dict["model_ema." + key[len("model."):].replace(".", "")] = state_dict[key] + 1.0
    state_dict["model_ema.num_updates"] = torch.tensor(10)
    path = write_checkpoint(state_dict, tmp_path / "with-ema.ckpt")
    plain = load_model(path, V1).state_dict()
    ema = load_model(path, V1, use_ema=True).state_dict()
    for key in unet_keys:
        assert torch.equal(plain[key], state_dict[key]) and torch.equal(ema[key], state_dict[key] + 1.0)
    with pytest.raises(LoadError, match="has none"):
        load_model(write_checkpoint(random_state_dict(V1), tmp_path / "no-ema.ckpt"), V1, use_ema=True)


def test_loading_never_initialises_parameters(tiny_checkpoint, monkeypatch):
    devices = []
    original = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: devices.append(self.weight.device.type) or original(self))
    load_model(tiny_checkpoint, V1)
    assert devices and set(devices) == {"meta"}


def test_dtype_applies_to_weights_but_not_schedule(tiny_checkpoint):
    model = load_model(tiny_checkpoint, V1, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.first_stage_model.decoder.conv_out.weight.dtype == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float32
    with torch.no_grad():
        cond = model.get_learned_conditioning(["x"])
        out = model.apply_model(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([500]), cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_schedule_matches_diffusers_scaled_linear(tiny_checkpoint):
    from diffusers import DDPMScheduler
    model = load_model(tiny_checkpoint, V1)
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(model.alphas_cumprod, reference.alphas_cumprod.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.betas, reference.betas.float(), rtol=1e-6, atol=1e-9)


def test_first_stage_round_trip_api(tiny_checkpoint):
    model = load_model(tiny_checkpoint, V1)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    posterior = model.encode_first_stage(image)
    first = model.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(3))
    second = model.get_first_stage_encoding(posterior, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second) and first.shape == (1, 4, 8, 8)
    torch.testing.assert_close(model.get_first_stage_encoding(posterior.mode()), posterior.mode() * 0.18215)


def test_released_configs_build_with_their_training_keys():
    v1, v2 = real_size_shapes("v1-inference.yaml"), real_size_shapes("v2-inference.yaml")
    assert v1["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert v2["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert v1["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert v2["cond_stage_model.model.token_embedding.weight"] == (49408, 1024)
    assert v1["first_stage_model.post_quant_conv.weight"] == (4, 4, 1, 1)


@pytest.mark.parametrize("config_name, file_name, flag, expected", [
    ("v1-inference.yaml", "sd-v1-4.ckpt", None, "v1-inference.yaml"),
    ("v2-inference.yaml", "v2-1_512-ema-pruned.safetensors", None, "v2-inference.yaml"),
    ("v2-inference.yaml", "v2-1_768-ema-pruned.safetensors", None, "v2-inference-v.yaml"),
    ("v2-inference.yaml", "my-finetune.ckpt", True, "v2-inference-v.yaml"),
    ("v2-inference.yaml", "768-v-ema.ckpt", False, "v2-inference.yaml"),
])
def test_config_is_recognised_from_keys(config_name, file_name, flag, expected):
    shapes = real_size_shapes(config_name)
    assert resolve_config(file_name, None, flag, shapes=shapes).name == expected


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"conditioner.embedders.0.transformer.x": (1,)}), "SDXL"),
    (lambda s: s.update({"model.diffusion_model.input_blocks.0.0.weight": (320, 5, 3, 3)}), "depth"),
    (lambda s: [s.pop(k) for k in list(s) if k.startswith("model.diffusion_model.")], "only an autoencoder"),
    (lambda s: s.update({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}), "pass it with --controlnet"),
])
def test_unsupported_checkpoints_get_one_clear_line(change, message):
    shapes = real_size_shapes("v1-inference.yaml")
    change(shapes)
    with pytest.raises(LoadError, match=message):
        resolve_config("x.ckpt", None, shapes=shapes)


def test_separate_vae_replaces_the_autoencoder(tiny_checkpoint, tmp_path):
    vae = {key[len("first_stage_model."):]: value + 0.5 for key, value in random_state_dict(V1, seed=5).items()
           if key.startswith("first_stage_model.")}
    vae_path = write_checkpoint(vae, tmp_path / "vae.safetensors")
    model = load_model(tiny_checkpoint, V1, vae=vae_path)
    torch.testing.assert_close(model.first_stage_model.decoder.conv_out.weight, vae["decoder.conv_out.weight"])


def test_model_hash_is_sha256_prefix_and_cached(tiny_checkpoint, tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()[:10]
    assert model_hash(tiny_checkpoint) == expected
    assert (tmp_path / "latent-diffusion" / "model-hashes.json").is_file()
    assert model_hash(tiny_checkpoint) == expected


def test_config_beside_the_checkpoint_is_its_own(tiny_checkpoints, tmp_path):
    checkpoint = Path(shutil.copy(tiny_checkpoints["v2", ".safetensors"], tmp_path / "custom.safetensors"))
    assert resolve_config(checkpoint).name == "v2-inference.yaml"
    shutil.copy(V2, tmp_path / "custom.yaml")
    assert resolve_config(checkpoint) == tmp_path / "custom.yaml"
    assert load_model(checkpoint).dtype == torch.float32
