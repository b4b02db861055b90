"""User mistakes on the three command lines (txt2img, img2img, inpaint): each gets exactly one line on stderr that names
the bad value, exit status 2, no traceback, nothing written and no model loaded. Images that merely look unusual
(RGBA, grey, 16-bit, CMYK, palette) are no mistake: they run, and 16-bit ones keep their tones."""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from checkpoint_factory import TEST_CONFIGS
from ldm.cli import img2img, inpaint, txt2img
from ldm.pipeline.images import load_image

SCRIPTS = {"t": txt2img.main, "i": img2img.main, "p": inpaint.main}
PROGS = {"t": "txt2img.py", "i": "img2img.py", "p": "inpaint.py"}
LAYER = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # a 32 x 32 projection of the tiny UNet
pytestmark = pytest.mark.usefixtures("one_thread")




def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_parameters(path: Path, pixels: np.ndarray, text: str) -> None:
    info = PngInfo()
    info.add_text("parameters", text)
    Image.fromarray(pixels).save(path, pnginfo=info)


def sixteen_bit_rgb_png(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (PIL writes none), each 8-bit value v stored as v * 257."""
    height, width, _ = pixels.shape
    wide = pixels.astype(np.uint16) * 257
    rows = b"".join(b"\x00" + wide[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
                     + png_chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def files(tmp_path_factory, tiny_checkpoints, tiny_xl_checkpoints) -> dict[str, str]:
    """Every bad (and odd but good) input the cases name, by name."""
    folder = tmp_path_factory.mktemp("mistakes")
    paths: dict[str, Path] = {}

    def write(name: str, data: bytes) -> None:
        paths[name] = folder / name
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_bytes(data)

    def make_dir(name: str) -> None:
        paths[name] = folder / name
        paths[name].mkdir()

    ckpt = tiny_checkpoints["v1", ".ckpt"]
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    paths.update(ckpt=ckpt, xl=tiny_xl_checkpoints["xl"], refiner=tiny_xl_checkpoints["xl-refiner"])
    # LoRA files
    lora = {f"{LAYER}.lora_down.weight": torch.randn(2, 32), f"{LAYER}.lora_up.weight": torch.randn(32, 2),
            f"{LAYER}.alpha": torch.tensor(1.0)}
    for name, tensors in (("lora", lora), ("not_lora", {"foo.weight": torch.zeros(3)}),
                          ("wide_lora", {**lora, f"{LAYER}.lora_up.weight": torch.randn(64, 2)}),
                          ("alien_lora", {key.replace("blocks_1_1", "blocks_9_1"): value
                                          for key, value in lora.items()}),
                          ("vae", {key[len("first_stage_model."):]: value.contiguous() for key, value in state.items()
                                   if key.startswith("first_stage_model.")})):
        paths[name] = folder / f"{name}.safetensors"
        save_file(tensors, str(paths[name]))
    write("truncated_lora.safetensors", paths["lora"].read_bytes()[:-50])
    write("empty.safetensors", b"")
    write("notes.ckpt", b"just some text\n")
    make_dir("folder.safetensors")
    whole = folder / "whole.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(whole))
    write("truncated.safetensors", whole.read_bytes()[: whole.stat().st_size // 2])
    # configs
    write("binary.yaml", b"\x00\x01\xff binary")
    write("no_model.yaml", b"foo: 1\n")
    write("no_such_target.yaml", b"model:\n  target: no.such.Module\n")
    # embeddings: one word twice, a folder without any, a width no model here has
    for twin in ("a", "b"):
        paths[f"emb_{twin}"] = folder / f"emb_{twin}"
        paths[f"emb_{twin}"].mkdir()
        torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, paths[f"emb_{twin}"] / "cat.pt")
    make_dir("emb_none")
    write("emb_none/readme.txt", b"no embeddings here")
    paths["wide_emb"] = folder / "wide_emb.safetensors"
    save_file({"emb_params": torch.randn(1, 48)}, str(paths["wide_emb"]))
    # images
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    paths["rgb"] = folder / "rgb.png"
    Image.fromarray(rgb).save(paths["rgb"])
    for name, mode in (("rgba", "RGBA"), ("grey", "L"), ("grey_alpha", "LA"), ("palette", "P"), ("cmyk", "CMYK")):
        paths[name] = folder / (f"{name}.jpg" if mode == "CMYK" else f"{name}.png")
        Image.fromarray(rgb).convert(mode).save(paths[name])
    paths["grey16"] = folder / "grey16.png"
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(paths["grey16"])
    paths["rgb16"] = folder / "rgb16.png"
    sixteen_bit_rgb_png(paths["rgb16"], rgb)
    write("zero.png", b"")
    make_dir("folder.png")
    write("huge.png", b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
          + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + png_chunk(b"IEND", b""))
    # metadata
    write("empty.yaml", b"")
    paths["photo"] = folder / "photo.jpg"
    Image.fromarray(rgb).save(paths["photo"])
    for name, text in (("list.yaml", "- prompt: a\n"), ("garbled.yaml", "prompt: [a\n"),
                       ("seed_abc.yaml", "prompt: a cat\nseed: abc\n"), ("h_negative.yaml", "prompt: a cat\nH: -5\n"),
                       ("scale_huge.yaml", "prompt: a cat\nscale: 1000000\n"),
                       ("hash_list.yaml", "prompt: a cat\nmodel_hash: [1]\n"),
                       ("embeddings_number.yaml", "prompt: a cat\nembeddings: 3\nlora: 7\n"),
                       ("weighting_text.yaml", "prompt: a cat\nprompt_weighting: yes please\n"),
                       ("switch_abc.yaml", "prompt: a cat\nrefiner: r\nrefiner_switch: abc\n"),
                       ("strength_abc.yaml", "prompt: a cat\nstrength: abc\ninit_image: x.png\n")):
        write(name, text.encode())
    for name, text in (("steps_abc", "a cat\nSteps: abc, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 32x32"),
                       ("size_by", "a cat\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 32by32"),
                       ("open_quote", 'a cat\nSteps: 2, Sampler: "DDIM, CFG scale: 7, Seed: 1')):
        paths[name] = folder / f"{name}.png"
        png_with_parameters(paths[name], rgb, text)
    # prompt files
    write("binary.txt", bytes(range(256)) * 4)
    write("empty.txt", b"")
    write("huge_size.txt", b'{"prompt": "a", "H": 100000000}\n')
    write("bad_weight.txt", b"(a cat:1.2.3)\n")
    write("a_file", b"x")
    return {name: str(path) for name, path in paths.items()}


def fill(text: str, files: dict) -> str:
    """`text` with each "{name}" replaced by the path files[name] (names hold dots, which str.format reads)."""
    return re.sub(r"\{([\w.]+)\}", lambda match: files[match.group(1)], str(text))


def run(script: str, flags: list, capsys, tmp_path, files: dict, ckpt: str = "{ckpt}",
        config: str | None = str(TEST_CONFIGS / "tiny-v1.yaml")) -> tuple[int, str, str, Path]:
    """(status, stdout, stderr, outdir) of `script` ("t", "i", "p") on the tiny SD 1.x model, 32 x 32 (img2img and
    inpaint: a 64 x 64 init image), 2 steps, one image; "{name}" in the flags is the path of files[name]."""
    outdir = tmp_path / "out"
    argv = ["--ckpt", ckpt, *(["--config", config] if config else []), "--ddim_steps", "2", "--n_samples", "1",
            "--n_iter", "1", "--precision", "full", "--outdir", str(outdir)]
    argv += {"t": ["--H", "32", "--W", "32"], "i": ["--init-img", "{rgb}"],
             "p": ["--init-img", "{rgb}", "--mask", "{grey}"]}[script]
    status = SCRIPTS[script]([fill(part, files) for part in argv + list(flags)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err, outdir


# (script, flags, words the one error line must hold); "{name}" is a file of the `files` fixture
MISTAKES = [
    # --lora: checked against the model's layout before any weight is read
    ("t", ["--lora", "{empty.safetensors}"], "empty.safetensors is not a checkpoint"),
    ("t", ["--lora", "{folder.safetensors}"], "folder.safetensors is a folder: pass one LoRA file"),
    ("t", ["--lora", "{not_lora}"], "1 key(s) are not kohya LoRA weights (e.g. foo.weight)"),
    ("t", ["--lora", "{truncated_lora.safetensors}"], "lies outside the file (is the file complete?)"),
    ("t", ["--lora", "{lora}:abc"], "the weight abc is not a number (use FILE:WEIGHT"),
    ("t", ["--lora", "{lora}:1e999"], "the weight 1e999 is not a finite number"),
    ("t", ["--lora", "{wide_lora}"], "do not fit the layer's weight [32, 32]"),
    ("t", ["--lora", "{alien_lora}"], "1 LoRA module(s) do not exist in this model"),
    ("t", ["--lora", "{ckpt}"], "key(s) are not kohya LoRA weights"),
    ("i", ["--lora", "{not_lora}"], "are not kohya LoRA weights"),
    ("p", ["--lora", "{vae}"], "are not kohya LoRA weights"),
    # --embeddings
    ("t", ["--embeddings", "{emb_none}"], "holds no embedding files"),
    ("t", ["--embeddings", "{emb_a}", "--embeddings", "{emb_b}"], "are both named 'cat' in prompts"),
    ("t", ["--embeddings", "{wide_emb}"], "its vectors are 48 wide"),
    ("t", ["--embeddings", ""], "an empty path was given"),
    ("i", ["--embeddings", "{notes.ckpt}"], "notes.ckpt is not a checkpoint"),
    # --refiner / --refiner_switch
    ("t", ["--refiner", "{refiner}", "--sampler", "euler"], "--refiner needs an SDXL base checkpoint as --ckpt"),
    ("t", ["--refiner_switch", "0.5"], "--refiner_switch 0.5 needs --refiner"),
    ("t", ["--refiner_switch", "abc"], "argument --refiner_switch: invalid float value: 'abc'"),
    # --prompt_weighting
    ("t", ["--prompt_weighting", "--prompt", "(a cat:1.2.3)"], "the weight in \":1.2.3)\""),
    ("t", ["--prompt_weighting", "--negative_prompt", "(fog:" + "9" * 400 + ")"], "overflows to inf"),
    ("t", ["--prompt_weighting", "--from-file", "{bad_weight.txt}"], "is not a number"),
    # --metadata_from
    ("t", ["--metadata_from", "{empty.txt}.missing.yaml"], "missing.yaml: No such file or directory"),
    ("t", ["--metadata_from", "{empty.yaml}"], "is not an image sidecar"),
    ("t", ["--metadata_from", "{photo}"], "photo.jpg holds no parameters text in its EXIF UserComment"),
    ("t", ["--metadata_from", "{rgb}"], "rgb.png has no \"parameters\" text chunk"),
    ("t", ["--metadata_from", "{list.yaml}"], "list.yaml is not an image sidecar"),
    ("t", ["--metadata_from", "{garbled.yaml}"], "garbled.yaml is not valid yaml"),
    ("t", ["--metadata_from", "{binary.yaml}"], "is neither a .yaml sidecar, a parameters text, nor a PNG"),
    ("t", ["--metadata_from", "{seed_abc.yaml}"], "seed_abc.yaml: seed must be an integer, got 'abc'"),
    ("t", ["--metadata_from", "{scale_huge.yaml}"], "scale 1e+06 is too large"),  # a recorded value no flag overrides
    ("t", ["--from-file", "{h_negative.yaml}"], "H -5 is not a positive multiple of 8"),
    ("t", ["--metadata_from", "{hash_list.yaml}"], "model_hash must be text, got [1]"),
    ("t", ["--metadata_from", "{weighting_text.yaml}"], "prompt_weighting must be true or false"),
    ("t", ["--metadata_from", "{switch_abc.yaml}"], "refiner_switch must be a finite number, got 'abc'"),
    ("i", ["--metadata_from", "{strength_abc.yaml}"], "strength must be a finite number, got 'abc'"),
    ("t", ["--metadata_from", "{steps_abc}"], "its \"parameters\" text cannot be read: Steps 'abc' is not a number"),
    ("t", ["--metadata_from", "{size_by}"], "Size '32by32' is not WIDTHxHEIGHT"),
    ("t", ["--metadata_from", "{open_quote}"], "is not a complete quoted text"),
    ("t", ["--metadata_from", "{zero.png}"], "zero.png is not a PNG image"),
    ("t", ["--metadata_from", "{huge.png}"], "exceeds limit of"),
    # --from-file
    ("t", ["--from-file", "{binary.txt}"], "is not UTF-8 (byte 0x80 on line 2)"),
    ("t", ["--from-file", "{emb_none}"], "is a directory, not a file"),
    ("t", ["--from-file", "{empty.txt}"], "has no prompts"),
    ("t", ["--from-file", "{huge_size.txt}"], "line 1: H 100000000 is too large"),
    # --ckpt, --config, --vae: what the loader would refuse, found before it reads a weight
    ("t", ["--ckpt", "{folder.safetensors}"], "folder.safetensors is a folder without model_index.json"),
    ("t", ["--ckpt", "{empty.safetensors}"], "empty.safetensors is not a checkpoint"),
    ("t", ["--ckpt", "{truncated.safetensors}"], "lies outside the file (is the file complete?)"),
    ("t", ["--ckpt", "{notes.ckpt}"], "notes.ckpt is not a checkpoint"),
    ("t", ["--ckpt", "{lora}"], "this file is a LoRA"),
    ("t", ["--ckpt", "{vae}"], "holds only an autoencoder (VAE): pass it with --vae"),
    ("i", ["--ckpt", "{lora}"], "this file is a LoRA"),
    ("t", ["--config", "{empty.txt}.missing.yaml"], "missing.yaml does not exist"),
    ("t", ["--config", "{binary.yaml}"], "cannot read config"),
    ("t", ["--config", "{no_model.yaml}"], "has no model.target"),
    ("t", ["--config", "{no_such_target.yaml}"], "cannot build its model (config target 'no.such.Module'"),
    ("t", ["--config", str(TEST_CONFIGS / "tiny-xl.yaml")], "the checkpoint does not fit config tiny-xl.yaml"),
    ("t", ["--vae", "{lora}"], "holds no autoencoder weights"),
    ("t", ["--vae", "{notes.ckpt}"], "notes.ckpt is not a checkpoint"),
    ("t", ["--vae", "{truncated.safetensors}"], "is the file complete?"),
    ("p", ["--vae", "{empty.safetensors}"], "is not a checkpoint"),
    # --outdir
    ("t", ["--outdir", "{a_file}"], "is a file, not a folder"),
    ("t", ["--outdir", "{a_file}/images"], "cannot be made: "),
    ("t", ["--outdir", ""], "--outdir is empty"),
    # --init-img / --mask
    ("i", ["--init-img", "{folder.png}"], "folder.png is a folder: pass the path of an image file"),
    ("i", ["--init-img", "{zero.png}"], "zero.png is not an image PIL can read"),
    ("i", ["--init-img", "{huge.png}"], "too large to open safely"),
    ("p", ["--init-img", "{huge.png}"], "too large to open safely"),
    ("p", ["--mask", "{folder.png}"], "--mask {folder.png} is a folder"),
    ("p", ["--mask", "{huge.png}"], "--mask {huge.png} is too large to open safely"),
    # numbers
    ("i", ["--strength", "nan"], "--strength nan is outside [0, 1]"),
    ("p", ["--strength", "-0.1"], "--strength -0.1 is outside [0, 1]"),
    ("i", ["--strength", "1.5"], "--strength 1.5 is outside [0, 1]"),
    ("t", ["--scale", "nan"], "scale nan is not a finite number"),
    ("t", ["--scale", "1e999"], "scale inf is not a finite number"),
    ("t", ["--scale", "100000"], "scale 100000 is too large"),
    ("i", ["--scale=-1e30"], "is too large: guidance scales lie in -100..100"),
    ("t", ["--scale", "-inf"], "argument --scale: expected one argument (a value that starts with '-' is written "
                               "--scale=VALUE)"),
    ("t", ["--ddim_steps", "0"], "steps 0 is out of range"),
    ("t", ["--ddim_steps", "100000"], "steps 100000 is out of range"),
    ("t", ["--ddim_steps", "nan"], "invalid int value: 'nan'"),
    ("t", ["--n_samples", "0"], "--n_samples 0 is too small"),
    ("t", ["--n_samples", "100000000000"], "would make 100000000000 images"),
    ("t", ["--n_iter", "100000000000"], "would make 100000000000 images"),
    ("t", ["--H", "100000"], "H 100000 is too large"),
    ("i", ["--W", "-64"], "W -64 is not a positive multiple of 8"),
    ("t", ["--seed", "-1"], "seed -1 is out of range"),
    ("t", ["--seed", str(2**32)], "seed 4294967296 is out of range"),
    ("t", ["--device", "bogus"], "unknown device 'bogus'"),
    ("t", ["--precision", "bogus"], "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize("script, flags, words", MISTAKES,
                         ids=[f"{script}:{' '.join(map(str, flags))[:60]}" for script, flags, _ in MISTAKES])
def test_a_mistake_gets_one_line_and_status_2_before_loading(script, flags, words, files, capsys, tmp_path):
    status, out, err, outdir = run(script, flags, capsys, tmp_path, files)
    assert status == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"{PROGS[script]}: error: "), err
    assert fill(words, files) in err, err
    assert "Loading model" not in out, "the model loaded before the mistake was found"
    assert not outdir.exists(), "a failed run wrote files"


@pytest.mark.parametrize("flags, words", [
    (["--refiner", "{refiner}", "--refiner_switch", "1.5", "--sampler", "euler"], "--refiner_switch 1.5 is outside"),
    (["--refiner", "{xl}", "--sampler", "euler"], "is not an SDXL refiner checkpoint (its weights are xl-base)"),
    (["--refiner", "{truncated.safetensors}", "--sampler", "euler"], "is not an SDXL refiner checkpoint"),
    (["--metadata_from", "{switch_abc.yaml}", "--refiner", "{refiner}", "--sampler", "euler"],
     "refiner_switch must be a finite number"),
])
def test_refiner_mistakes_on_an_sdxl_base(flags, words, files, capsys, tmp_path):
    status, out, err, outdir = run("t", flags + ["--H", "64", "--W", "64"], capsys, tmp_path, files, ckpt="{xl}",
                                   config=str(TEST_CONFIGS / "tiny-xl.yaml"))
    assert status == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert fill(words, files) in err and "Loading model" not in out and not outdir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_graphs_on_the_cpu(files, capsys, tmp_path):
    status, _, err, outdir = run("t", ["--cuda_graphs", "--device", "cpu"], capsys, tmp_path, files)
    assert status == 2 and "--cuda_graphs needs a CUDA GPU (the device is cpu)" in err and not outdir.exists()


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
def test_an_unwritable_outdir_is_refused_before_loading(files, capsys, tmp_path):
    """Permission bits do not tell (root may write anywhere they allow): no file can be made under /proc, even by
    root, and the probe finds that out before anything loads."""
    status, out, err = run("t", ["--outdir", "/proc/latent-diffusion-outputs/images"], capsys, tmp_path, files)[:3]
    assert status == 2 and err.strip().splitlines() == [
        "txt2img.py: error: --outdir /proc/latent-diffusion-outputs/images: files cannot be created in /proc; pick "
        "another --outdir"]
    assert "Loading model" not in out


@pytest.mark.parametrize("script, flags", [
    ("i", ["--init-img", "{rgba}"]), ("i", ["--init-img", "{grey16}"]), ("i", ["--init-img", "{rgb16}"]),
    ("i", ["--init-img", "{cmyk}"]), ("i", ["--init-img", "{grey_alpha}"]), ("i", ["--init-img", "{palette}"]),
    ("p", ["--mask", "{grey16}"]), ("p", ["--init-img", "{cmyk}", "--mask", "{rgba}"]),
    ("t", ["--vae", "{ckpt}"]),  # a whole checkpoint as --vae: its autoencoder
])
def test_unusual_but_valid_inputs_run(script, flags, files, capsys, tmp_path):
    status, _, err, outdir = run(script, flags + ["--skip_grid"], capsys, tmp_path, files)
    assert status == 0, err
    assert len(list((outdir / "samples").glob("*.png"))) == 1


def test_sixteen_bit_and_cmyk_images_keep_their_tones(files):
    """PIL's convert("RGB") clips 16-bit grey to white; the init image must be the 8-bit image it was made from."""
    reference = np.asarray(Image.open(files["rgb"]).convert("RGB")).astype(int)
    grey16 = np.asarray(load_image(files["grey16"])).astype(int)
    assert (grey16 == reference[..., :1]).all()
    assert (np.asarray(load_image(files["rgb16"])).astype(int) == reference).all()
    assert np.abs(np.asarray(load_image(files["cmyk"])).astype(int) - reference).mean() < 8  # JPEG


def test_prompt_files_with_a_bom_or_crlf_read_as_plain_utf8(tmp_path):
    from ldm.cli.prompts import read_prompt_file

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbfa cat\r\n{\"prompt\": \"a dog\", \"seed\": 3}\r\n")
    jobs = read_prompt_file(str(path))
    assert [job.prompt for job in jobs] == ["a cat", "a dog"] and jobs[1].overrides == {"seed": 3}
