"""`<lora:name:weight>` in prompts, as AUTOMATIC1111 reads them: parsed with its rules, taken out of the text, the LoRA
merged (text encoder and UNet weights apart), its hash written as A1111 writes it; a tag naming a missing file is one
line before any work."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from checkpoint_factory import write_lora
from image_files import parameters, pixels, sidecar
from ldm.pipeline.extra_networks import LoraTag, lora_tags, strip_extra_networks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("prompt, expected", [
    ("a cat <lora:style:0.7>", [LoraTag("style", 0.7, 0.7)]),
    ("<lora:style>", [LoraTag("style", 1.0, 1.0)]),
    ("<lora:style:0.5:1.5>", [LoraTag("style", 0.5, 1.5)]),  # A1111: te first, then unet
    ("<lora:style:te=0.25:unet=2>", [LoraTag("style", 0.25, 2.0)]),
    ("<lora:style:0.5:unet=0>", [LoraTag("style", 0.5, 0.0)]),
    ("<lyco:other:0.3>, <lora:style:1>", [LoraTag("other", 0.3, 0.3), LoraTag("style", 1.0, 1.0)]),
    ("<hypernet:x:1> a dog", []),
    ("no tags (at:1.2) here", []),
])
def test_tags_are_read_as_automatic1111_reads_them(prompt, expected):
    assert lora_tags(prompt) == expected


def test_every_tag_kind_leaves_the_text():
    assert strip_extra_networks("a cat <lora:style:0.7>, <hypernet:x:1>sitting") == "a cat , sitting"


@pytest.fixture
def lora_folder(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    folder = tmp_path / "Lora" / "styles"
    folder.mkdir(parents=True)
    write_lora(folder / "style.safetensors", state)
    return tmp_path / "Lora"


def test_a_tag_merges_the_lora_as_the_flag_does_and_records_its_hash(txt2img, tmp_path, lora_folder):
    path = lora_folder / "styles" / "style.safetensors"
    status, _, err = txt2img("--prompt", "a red cube <lora:style:0.7>", "--lora_dir", lora_folder, "--skip_grid",
                             outdir=tmp_path / "tag")
    assert status == 0, err
    status, _, err = txt2img("--prompt", "a red cube", "--lora", f"{path}:0.7", "--skip_grid",
                             outdir=tmp_path / "flag")
    assert status == 0, err
    status, _, err = txt2img("--prompt", "a red cube", "--skip_grid", outdir=tmp_path / "none")
    tagged, flagged = (pixels(tmp_path / name / "samples" / "00000.png") for name in ("tag", "flag"))
    assert np.array_equal(tagged, flagged)
    assert not np.array_equal(tagged, pixels(tmp_path / "none" / "samples" / "00000.png"))
    data = path.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    text = parameters(tmp_path / "tag" / "samples" / "00000.png")
    assert text.startswith("a red cube <lora:style:0.7>\n") and f'Lora hashes: "style: {addnet}"' in text
    assert sidecar(tmp_path / "tag" / "samples" / "00000.png")["prompt"] == "a red cube <lora:style:0.7>"


def test_text_encoder_and_unet_weights_apart(tiny_checkpoint, tiny_config, lora_folder):
    from ldm.pipeline import Loras, Pipeline, Request

    def weights(tag: str) -> tuple[torch.Tensor, torch.Tensor]:
        request = Request(f"a cat {tag}", height=32, width=32, steps=1)
        loras = Loras(tags=lora_tags(request.prompts[0]), folder=lora_folder)
        model = Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), addons=[loras], fast_paths=False,
                                         hash_files=False).model
        unet = model.model.diffusion_model.middle_block[1].proj_in.weight.detach().clone()
        text = model.cond_stage_model.transformer.text_model.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
        return unet, text

    base_unet, base_text = weights("")
    unet, text = weights("<lora:style:0:1>")  # text encoder weight 0, UNet 1
    assert torch.equal(text, base_text) and not torch.equal(unet, base_unet)
    unet, text = weights("<lora:style:1:0>")
    assert torch.equal(unet, base_unet) and not torch.equal(text, base_text)


def test_a_tag_naming_a_missing_file_is_one_line_before_any_work(txt2img, tmp_path, lora_folder):
    status, out, err = txt2img("--prompt", "a cat <lora:nowhere:0.5>", "--lora_dir", lora_folder,
                               outdir=tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and lines == [f"txt2img.py: error: <lora:nowhere> names a LoRA that is not in {lora_folder} "
                                     f"(looked for nowhere.safetensors, .pt, .ckpt, .bin, also in its subfolders): "
                                     f"put it there or pass --lora_dir"]
    assert "Loading model" not in out and not (tmp_path / "out").exists()


def test_prompts_of_one_run_must_name_the_same_loras(txt2img, tmp_path, lora_folder):
    shutil.copy(lora_folder / "styles" / "style.safetensors", lora_folder / "other.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat <lora:style:0.5>\na dog <lora:other:0.5>\n")
    status, _, err = txt2img("--from-file", prompts, "--lora_dir", lora_folder, outdir=tmp_path / "out")
    assert status == 2 and "name different <lora:...> tags or weights" in err
