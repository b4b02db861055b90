"""txt2img's memory advice (before loading and on out-of-memory), the compile/graph warm-up, and --lora."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from checkpoint_factory import write_checkpoint, write_lora
from ldm.checkpoints import read_checkpoint, read_shapes
from ldm.cli.arguments import UsageError, lora_specs
from ldm.pipeline.memory import check_weights_fit, weight_bytes_by_part
from ldm.loading import load_model

GIB = 2**30


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(int)


# --- weights against free memory -------------------------------------------------------------------------------------
def test_weight_bytes_per_part_equal_the_loaded_sub_models(tiny_checkpoint, tiny_config):
    sizes = weight_bytes_by_part(read_shapes(tiny_checkpoint), torch.float16)
    model = load_model(tiny_checkpoint, tiny_config, device="cpu", dtype=torch.float16)
    parts = {"unet": model.model.diffusion_model, "autoencoder": model.first_stage_model,
             "text encoder": model.cond_stage_model}
    for name, part in parts.items():  # every entry of the sub-model's state dict, counted at 2 bytes
        assert sizes[name] == 2 * sum(tensor.numel() for tensor in part.state_dict().values()), name
    assert min(sizes.values()) > 0


@pytest.mark.parametrize("free, offload, advice", [
    (10 * GIB, None, None),
    (3 * GIB, None, "use --offload model"),  # 3.5 GiB in all, the largest part 2 GiB
    (1 * GIB, None, "use --offload sequential"),
    (3 * GIB, "model", None),
    (1 * GIB, "model", r"with --offload model the unet \(2.00 GiB in float16\) must fit on the GPU at once but cuda "
                       r"has 1.00 GiB free of 16.00 GiB: use --offload sequential$"),
    (1, "sequential", None),
])
def test_weights_that_cannot_fit_name_the_flag_that_helps(free, offload, advice):
    parts = {"unet": 2 * GIB, "autoencoder": GIB // 2, "text encoder": GIB}
    if advice is None:
        check_weights_fit(parts, free, 16 * GIB, offload, torch.device("cuda"), torch.float16)
        return
    with pytest.raises(UsageError, match=advice):
        check_weights_fit(parts, free, 16 * GIB, offload, torch.device("cuda"), torch.float16)


def test_fp32_advice_also_names_half_precision():
    with pytest.raises(UsageError, match=r"need 3.50 GiB in float32 but cuda:1 has 3.00 GiB free of 24.00 GiB: use "
                                         r"--offload model or --precision autocast \(fp16\)$"):
        check_weights_fit({"unet": 2 * GIB, "autoencoder": GIB // 2, "text encoder": GIB}, 3 * GIB, 24 * GIB,
                          None, torch.device("cuda:1"), torch.float32)


def test_the_cli_stops_before_loading_when_the_gpu_memory_is_too_small(txt2img, tmp_path, monkeypatch):
    import ldm.pipeline.pipeline as pipeline_module

    real_load = pipeline_module.load_model
    monkeypatch.setattr(pipeline_module, "accelerator_memory", lambda device: (1000, 8 * GIB))
    monkeypatch.setattr(pipeline_module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    status, _, err = txt2img("--precision", "full", outdir=tmp_path / "out")
    assert status == 2 and "error: the model's weights need" in err and "use --offload sequential" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()

    monkeypatch.setattr(pipeline_module, "accelerator_memory", lambda device: (8 * GIB, 8 * GIB))
    monkeypatch.setattr(pipeline_module, "load_model", real_load)
    assert txt2img(outdir=tmp_path / "fits")[0] == 0  # memory that fits: the run goes on


# --- out of memory during a run ---------------------------------------------------------------------------------------
def raise_out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_while_decoding_names_the_vae_flags(txt2img, tmp_path, monkeypatch):
    import ldm.pipeline.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "decode_to_pixels", raise_out_of_memory)
    status, _, err = txt2img("--attention_slicing", outdir=tmp_path / "out")
    assert status == 1 and ("error: out of memory on cpu while decoding one 32x32 image: try --vae_tiling, "
                            "--offload model, --offload sequential, --bf16 or a smaller --H/--W than 32x32") in err
    assert not list((tmp_path / "out").rglob("*.png"))  # no image; the manifest records the failure


def test_out_of_memory_advice_leaves_out_the_flags_already_used(txt2img, tmp_path, monkeypatch):
    from ldm.pipeline import Pipeline

    monkeypatch.setattr(Pipeline, "render", raise_out_of_memory)
    status, _, err = txt2img("--attention_slicing", "--bf16", outdir=tmp_path / "out")
    assert status == 1 and "try --offload model, --offload sequential or a smaller --H/--W" in err


# --- warm-up ----------------------------------------------------------------------------------------------------------
def test_compile_warms_up_once_per_batch_shape_and_reports_it_apart(txt2img, tmp_path, monkeypatch):
    import ldm.optimize
    from ldm.pipeline import Pipeline

    compiled, warm_ups = [], []
    monkeypatch.setattr(ldm.optimize, "compile_model", lambda model: compiled.append(model) or ["unet"])
    real = Pipeline.render

    def counting(self, request, warm_up=False):
        if warm_up:
            warm_ups.append((request.batch_size, request.height))
        return real(self, request, warm_up)

    monkeypatch.setattr(Pipeline, "render", counting)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a\nb\nc\n{"prompt": "d", "H": 64}\n')
    status, out, _ = txt2img("--compile", "--from-file", prompts, "--n_samples", 2, "--skip_grid",
                             outdir=tmp_path / "compiled")
    assert status == 0 and len(compiled) == 1
    assert sorted(warm_ups) == [(1, 32), (1, 64), (2, 32)]  # batches [a, b], [c], [d at 64]
    assert "warm-up (compile/capture, once per batch shape):" in out
    assert "sampling: 4 images" in out  # the warm-up's one-step batches are not counted
    assert txt2img("--from-file", prompts, "--n_samples", 2, "--skip_grid", outdir=tmp_path / "plain")[0] == 0
    for index in range(4):  # warming up leaves the images as they are
        name = f"samples/{index:05d}.png"
        assert np.array_equal(pixels(tmp_path / "compiled" / name), pixels(tmp_path / "plain" / name))


def test_cuda_graphs_need_a_cuda_gpu(txt2img, tmp_path):
    status, _, err = txt2img("--cuda_graphs", "--device", "cpu", outdir=tmp_path / "out")
    assert status == 2 and "error: --cuda_graphs needs a CUDA GPU (the device is cpu)" in err


# --- LoRA -------------------------------------------------------------------------------------------------------------


def test_lora_flag_gives_the_image_of_the_merged_checkpoint(txt2img, tiny_checkpoint, tmp_path):
    state_dict, _ = read_checkpoint(tiny_checkpoint)
    deltas = write_lora(tmp_path / "style.safetensors", state_dict)
    merged = {key: value + 0.5 * deltas[key] if key in deltas else value for key, value in state_dict.items()}
    write_checkpoint(merged, tmp_path / "merged.ckpt")

    status, out, _ = txt2img("--lora", f"{tmp_path / 'style.safetensors'}:0.5", outdir=tmp_path / "lora")
    assert status == 0 and "style.safetensors: 3 layers, weight 0.5" in out
    assert txt2img("--ckpt", tmp_path / "merged.ckpt", outdir=tmp_path / "merged")[0] == 0
    assert txt2img(outdir=tmp_path / "base")[0] == 0
    lora, merged_image = (pixels(tmp_path / name / "samples/00000.png") for name in ("lora", "merged"))
    assert np.abs(lora - merged_image).max() <= 1
    assert np.abs(lora - pixels(tmp_path / "base/samples/00000.png")).max() > 10  # the LoRA did change the image
    with Image.open(tmp_path / "lora/samples/00000.png") as image:
        assert "Lora: \"style:0.5\"" in image.info["parameters"]
    assert yaml.safe_load((tmp_path / "lora/samples/00000.yaml").read_text())["lora"] == "style:0.5"


def test_lora_mistakes_get_one_line(txt2img, tiny_checkpoint, tmp_path):
    status, _, err = txt2img("--lora", tmp_path / "missing.safetensors:0.8", outdir=tmp_path / "a")
    assert status == 2 and f"--lora {tmp_path / 'missing.safetensors'}:0.8: {tmp_path / 'missing.safetensors'} " \
                           f"not found" in err
    state_dict, _ = read_checkpoint(tiny_checkpoint)
    write_lora(tmp_path / "wide.safetensors", {key: torch.zeros(value.shape[0] * 2, *value.shape[1:])
                                               for key, value in state_dict.items()})
    status, _, err = txt2img("--lora", tmp_path / "wide.safetensors", "--precision", "full", outdir=tmp_path / "b")
    assert status == 2 and "do not fit the layer's weight" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_lora_specs_split_the_weight_only_when_it_is_a_number(tmp_path):
    plain = tmp_path / "x.safetensors"
    plain.write_bytes(b"")
    odd = tmp_path / "odd:name.safetensors"
    odd.write_bytes(b"")
    assert lora_specs([str(plain), f"{plain}:-0.25", str(odd), f"{odd}:2"]) == [
        (str(plain), 1.0), (str(plain), -0.25), (str(odd), 1.0), (str(odd), 2.0)]
    with pytest.raises(UsageError, match="not a finite number"):
        lora_specs([f"{plain}:nan"])


# --- prompts longer than the text encoder reads -----------------------------------------------------------------------
def test_long_prompts_get_a_note_naming_the_ignored_words(txt2img, tmp_path):
    long_prompt = "photo of a cat " * 20  # 4 tokens a repeat: 80 tokens, 5 past the 75 the encoder reads
    status, _, err = txt2img("--prompt", long_prompt, "--negative_prompt", "blurry", "--n_samples", 2,
                             outdir=tmp_path / "out")
    assert status == 0
    notes = [line for line in err.splitlines() if "tokens" in line]
    assert notes == ['txt2img.py: note: prompt "photo of a cat photo of a cat photo o..." has 80 tokens but the '
                     'text encoder reads 75: "cat photo of a cat" is ignored']
