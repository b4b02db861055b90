"""Textual-inversion embeddings: prompt embeddings equal diffusers' `load_textual_inversion` (SD 1.x, SDXL), every file
format, known answers on SD 2.x and the SDXL refiner, width mistakes in one line, and --embeddings in the CLI."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from checkpoint_factory import TEST_CONFIGS, write_checkpoint
from ldm.pipeline.decoding import decode_to_pixels
from ldm.loading import load_model
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import sample
from ldm.textual_inversion import (EmbeddingError, load_textual_inversion, prompt_encoders, read_embeddings,
                                   read_textual_inversion)
from pickle_payload import Payload
from reference_sd import SCHEDULE, diffusers_pipeline
from reference_sdxl import diffusers_parts

WIDTH = 32  # every tiny text encoder's
PROMPTS = ["a portrait of my-style, highly detailed", "a red cat", "a cat " * 36 + "a my-style"]
NEGATIVES = ["easyneg, blurry", "my-style", "low quality"]


def random_vectors(count: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    """What A1111's textual-inversion training saves."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone()}, "name": "trained-name",
                "step": 3000, "sd_checkpoint": "abcdef1234", "sd_checkpoint_name": "sd-v1-4"}, path)
    return path


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint):
    return load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml")


# --- SD 1.x against diffusers ----------------------------------------------------------------------------------------
@torch.no_grad()
def test_sd1_prompt_embeddings_equal_diffusers_load_textual_inversion(tiny_checkpoint, tmp_path):
    model = load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml")
    plain_before = model.get_learned_conditioning(["a red cat", "my-styles and easynegs"])
    style, negative = random_vectors(3, 0), random_vectors(1, 1)
    load_textual_inversion(model, write_a1111_pt(tmp_path / "my-style.pt", style))
    torch.save({"<anything>": negative[0].clone()}, tmp_path / "easyneg.bin")  # diffusers: {token: [width]}
    load_textual_inversion(model, tmp_path / "easyneg.bin")

    (tmp_path / "vocabulary").mkdir()
    pipe = diffusers_pipeline(tiny_checkpoint, tmp_path / "vocabulary", DDIMScheduler(clip_sample=False, **SCHEDULE))
    pipe.load_textual_inversion(style, token="my-style")
    pipe.load_textual_inversion(negative, token="easyneg")
    expected, expected_negative = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, True, NEGATIVES)
    ours, ours_negative = model.get_learned_conditioning(PROMPTS), model.get_learned_conditioning(NEGATIVES)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_negative, expected_negative, atol=1e-5, rtol=0)

    # prompts that do not name an embedding (a longer word is another word) encode bit for bit as before
    assert torch.equal(model.get_learned_conditioning(["a red cat", "my-styles and easynegs"]), plain_before)
    # the three vectors take three of the 75 places: the long prompt keeps the first two
    tokens = model.cond_stage_model.tokenize(PROMPTS[2:])[0]
    assert tokens[1:74].tolist() == model.cond_stage_model.tokenize(["a cat " * 36 + "a"])[0, 1:74].tolist()
    assert tokens[74:].tolist() == [-1, -2, 49407]


# --- SDXL against diffusers ------------------------------------------------------------------------------------------
@torch.no_grad()
def test_sdxl_clip_l_and_clip_g_equal_diffusers(tiny_xl_checkpoints, hf_vocabulary, tmp_path):
    model = load_model(tiny_xl_checkpoints["xl"], TEST_CONFIGS / "tiny-xl.yaml")
    size = dict(original_size=(64, 64), target_size=(64, 64))
    before = model.get_learned_conditioning(["a red cat"], **size)
    clip_l, clip_g = random_vectors(2, 2), random_vectors(2, 3)
    write_checkpoint({"clip_l": clip_l, "clip_g": clip_g}, tmp_path / "my-style.safetensors")
    load_textual_inversion(model, tmp_path / "my-style.safetensors")

    pipe = StableDiffusionXLPipeline(**diffusers_parts(tiny_xl_checkpoints["xl"], "xl", hf_vocabulary),
                                     scheduler=DDIMScheduler(clip_sample=False, **SCHEDULE))
    # diffusers' documented way: each vector set into its encoder
    pipe.load_textual_inversion(clip_l, token="my-style", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token="my-style", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    embeds, negative_embeds, pooled, _ = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                            do_classifier_free_guidance=True,
                                                            negative_prompt=NEGATIVES)
    cond = model.get_learned_conditioning(PROMPTS, **size)
    torch.testing.assert_close(cond["crossattn"], embeds, atol=1e-5, rtol=0)
    # the pooled prompt embedding leads the vector, read at each prompt's end token
    torch.testing.assert_close(cond["vector"][:, :pooled.shape[1]], pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.get_unconditional_conditioning(NEGATIVES, **size)["crossattn"], negative_embeds,
                               atol=1e-5, rtol=0)
    after = model.get_learned_conditioning(["a red cat"], **size)
    assert all(torch.equal(after[key], before[key]) for key in before)


# --- known answers: vectors copied from the model's own token table -------------------------------------------------
@pytest.mark.parametrize("family, config", [("v2", "tiny-v2.yaml"), ("xl-refiner", "tiny-xl-refiner.yaml")])
@torch.no_grad()
def test_vectors_of_real_words_encode_as_those_words(family, config, tiny_checkpoints, tiny_xl_checkpoints,
                                                     tmp_path):
    """On OpenCLIP encoders (SD 2.x, the SDXL refiner's bigG) an embedding holding the table rows of "red cat" makes
    "a my-style" encode exactly as "a red cat"."""
    path = tiny_checkpoints[family, ".ckpt"] if family == "v2" else tiny_xl_checkpoints[family]
    model = load_model(path, TEST_CONFIGS / config)
    (encoder,) = prompt_encoders(model)
    rows = encoder.token_embedding.weight[encoder.tokenizer.encode("red cat")].clone()
    vectors = {"emb_params": rows} if family == "v2" else {"clip_l": torch.zeros(2, 8), "clip_g": rows}
    write_checkpoint(vectors, tmp_path / "my-style.safetensors")
    load_textual_inversion(model, tmp_path / "my-style.safetensors")
    if family == "v2":
        ours, expected = (model.get_learned_conditioning([text]) for text in ("a My-Style", "a red cat"))
    else:
        ours, expected = (model.get_learned_conditioning([text], original_size=(64, 64), target_size=(64, 64))
                          ["crossattn"] for text in ("a My-Style", "a red cat"))
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


# --- file formats ----------------------------------------------------------------------------------------------------
def test_every_file_format_reads_its_vectors_and_name(tmp_path):
    vectors = random_vectors(2, 4)
    write_a1111_pt(tmp_path / "a1111.pt", vectors)
    write_checkpoint({"emb_params": vectors}, tmp_path / "a1111-export.safetensors")
    (tmp_path / "cat-toy").mkdir()
    torch.save({"<cat-toy>": vectors[0].clone()}, tmp_path / "cat-toy" / "learned_embeds.bin")
    write_checkpoint({"anything": vectors}, tmp_path / "single.safetensors")
    write_checkpoint({"clip_g": vectors, "clip_l": vectors[:, :16].contiguous()}, tmp_path / "xl.safetensors")
    (tmp_path / "notes.txt").write_text("not an embedding")

    embeddings = {embedding.name: embedding for embedding in read_embeddings([tmp_path])}
    assert sorted(embeddings) == ["<cat-toy>", "a1111", "a1111-export", "single", "xl"]
    for name in ("a1111", "a1111-export", "single"):
        assert list(embeddings[name].vectors) == [""]
        assert torch.equal(embeddings[name].vectors[""], vectors)
    assert torch.equal(embeddings["<cat-toy>"].vectors[""], vectors[:1])
    assert embeddings["xl"].vectors["clip_l"].shape == (2, 16) and embeddings["xl"].num_vectors == 2

    Payload.marker = str(tmp_path / "payload-ran")
    torch.save({"string_to_param": {"*": vectors}, "payload": Payload()}, tmp_path / "code.pt")
    with pytest.raises(EmbeddingError, match="refusing to load .*code.pt.*could run code"):
        read_textual_inversion(tmp_path / "code.pt")
    assert not (tmp_path / "payload-ran").exists()
    write_checkpoint({"a": vectors, "b": vectors.clone()}, tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingError, match="two.safetensors is not a textual-inversion embedding"):
        read_textual_inversion(tmp_path / "two.safetensors")
    write_checkpoint({"emb_params": vectors}, tmp_path / "A1111.safetensors")
    with pytest.raises(EmbeddingError, match="are both named 'a1111' in prompts"):
        read_embeddings([tmp_path / "a1111.pt", tmp_path / "A1111.safetensors"])


def test_wrong_files_for_the_model_change_nothing(sd1, tiny_xl_checkpoints, tmp_path):
    tokens_before = sd1.cond_stage_model.tokenize(["a wide"]).tolist()
    write_checkpoint({"emb_params": random_vectors(1, 5, 1024)}, tmp_path / "wide.safetensors")
    with pytest.raises(EmbeddingError, match=r"wide.safetensors: its vectors are 1024 wide, for SD 2.x .*this "
                                             r"model's text encoder is 32 wide"):
        load_textual_inversion(sd1, tmp_path / "wide.safetensors")
    assert sd1.cond_stage_model.tokenize(["a wide"]).tolist() == tokens_before
    xl = load_model(tiny_xl_checkpoints["xl"], TEST_CONFIGS / "tiny-xl.yaml")
    write_checkpoint({"emb_params": random_vectors(1, 5)}, tmp_path / "sd1.safetensors")
    with pytest.raises(EmbeddingError, match="one set of vectors.*needs a file with clip_l and clip_g"):
        load_textual_inversion(xl, tmp_path / "sd1.safetensors")
    write_checkpoint({"clip_g": random_vectors(1, 5)}, tmp_path / "g-only.safetensors")
    with pytest.raises(EmbeddingError, match="has clip_g vectors but none for this model's clip_l"):
        load_textual_inversion(xl, tmp_path / "g-only.safetensors")
    assert all(encoder.token_embedding.added_vectors is None for encoder in prompt_encoders(xl))


# --- the CLI ---------------------------------------------------------------------------------------------------------
def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(int)


@torch.no_grad()
def test_embeddings_flag_gives_the_library_image_and_records_the_hash(txt2img, tiny_checkpoint, tiny_config,
                                                                      tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write_a1111_pt(folder / "my-style.pt", random_vectors(3, 6) * 3)
    write_checkpoint({"emb_params": random_vectors(1, 7) * 3}, folder / "unused.safetensors")
    prompt = "a portrait, my-style"
    status, out, _ = txt2img("--prompt", prompt, "--embeddings", folder, outdir=tmp_path / "with")
    assert status == 0 and "Embeddings: my-style (3), unused (1)" in out
    assert txt2img("--prompt", prompt, outdir=tmp_path / "without")[0] == 0
    with_embedding = pixels(tmp_path / "with/samples/00000.png")
    assert np.abs(with_embedding - pixels(tmp_path / "without/samples/00000.png")).max() > 10

    model = load_model(tiny_checkpoint, tiny_config)
    load_textual_inversion(model, folder / "my-style.pt")
    cond, uncond = model.get_learned_conditioning([prompt]), model.get_learned_conditioning([""])
    latents = sample(model, "ddim", 2, (1, 4, 4, 4), cond, uncond, 7.5, ImageNoise([42]), eta=0.0)
    assert np.abs(decode_to_pixels(model, latents, print)[0].astype(int) - with_embedding).max() <= 1

    from ldm.checkpoints import embedding_hash
    recorded = f"my-style: {embedding_hash(folder / 'my-style.pt')}"
    assert yaml.safe_load((tmp_path / "with/samples/00000.yaml").read_text())["embeddings"] == recorded
    with Image.open(tmp_path / "with/samples/00000.png") as image:
        assert f'TI hashes: "{recorded}"' in image.info["parameters"]
    # the sidecar runs again, and without the embedding the user is told the image will differ
    status, _, err = txt2img("--metadata_from", tmp_path / "with/samples/00000.yaml", outdir=tmp_path / "again")
    assert status == 0 and "made with the embeddings my-style" in err


def test_embedding_mistakes_get_one_line_and_exit_2(txt2img, tmp_path):
    write_checkpoint({"emb_params": random_vectors(2, 8, 768)}, tmp_path / "sd15-style.safetensors")
    status, out, err = txt2img("--embeddings", tmp_path / "sd15-style.safetensors", outdir=tmp_path / "a")
    assert status == 2 and not (tmp_path / "a").exists()
    (error,) = [line for line in err.splitlines() if "error" in line]
    assert error.startswith("txt2img.py: error: --embeddings: embedding ")
    assert "sd15-style.safetensors: its vectors are 768 wide, for SD 1.x (CLIP ViT-L)" in error
    status, _, err = txt2img("--embeddings", tmp_path / "missing", outdir=tmp_path / "b")
    assert status == 2 and "--embeddings: embedding file or folder" in err and "missing does not exist" in err


def test_long_prompt_note_counts_the_vectors(txt2img, tmp_path):
    write_checkpoint({"emb_params": random_vectors(8, 9)}, tmp_path / "x.safetensors")
    status, _, err = txt2img("--prompt", "a cat " * 34 + "x", "--embeddings", tmp_path / "x.safetensors",
                             "--skip_save", "--skip_grid", outdir=tmp_path / "a")
    # 68 tokens and 8 vectors: the last vector is past the 75 places
    assert status == 0 and "has 76 tokens but the text encoder reads 75: \"x\" is ignored" in err
