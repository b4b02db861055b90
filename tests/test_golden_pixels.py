"""Golden pixels: the exact images today's scripts make for a table of requests, recorded in tests/golden/pixels.npz.

The generation code is about to move into `ldm.pipeline`; these requests go through the scripts' entry points
(`ldm.cli.<script>.main(argv)`, which stay) and every `samples/*.png` they write must equal the recorded pixels bit for
bit. The table covers every sampler, batches, `--fixed_code`, prompt files with per-line settings, negative prompts,
prompt weighting, SD 1.x / 2.x (v prediction) / SDXL base and refiner hand-off, the shapes model, img2img, inpainting
(latent blending and an inpainting model), ControlNet, LoRA, textual inversion, the x4 upscaler and memory flags.

Record (only when today's images are the intended ones) with the table below:

    python tests/test_golden_pixels.py --record tests/golden/pixels.npz

(with another commit's code: `git worktree add --detach /tmp/old COMMIT`, then the same command with
`PYTHONPATH=/tmp/old:tests`; the recorder prints which `ldm` made the images).
The input files (tiny random checkpoints, images, masks, LoRA, embeddings, ControlNet) are rebuilt from fixed seeds by
the helpers in tests/; only the images the scripts write are compared (their metadata may change).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from checkpoint_factory import (TEST_CONFIGS, make_tiny_checkpoint, make_tiny_controlnet, make_tiny_xl_checkpoint,
                                write_checkpoint, write_lora)
from ldm.checkpoints import read_checkpoint
from ldm.cli import img2img, inpaint, txt2img, upscale
from smooth_inputs import smooth_image

FIXTURE = Path(__file__).resolve().parent / "golden" / "pixels.npz"
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"

SMALL = ["--H", "32", "--W", "32", "--ddim_steps", "4", "--n_iter", "1", "--n_samples", "1", "--skip_grid",
         "--seed", "17", "--prompt", PROMPT]
V1 = ["--ckpt", "{v1}", "--config", "{v1_config}", *SMALL]
V2_V = ["--ckpt", "{v2}", "--config", "{v2_v_config}", *SMALL]
XL = ["--ckpt", "{xl}", "--config", "{xl_config}", *SMALL, "--scale", "5"]
IMAGE = ["--init-img", "{init}", "--ddim_steps", "4", "--n_iter", "1", "--n_samples", "1", "--skip_grid",
         "--seed", "23", "--prompt", PROMPT, "--precision", "full"]
SCRIPTS = {"txt2img": txt2img.main, "img2img": img2img.main, "inpaint": inpaint.main, "upscale": upscale.main}
K_SAMPLERS = ["euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2s_a", "dpmpp_2m", "dpmpp_sde",
              "dpmpp_2m_sde", "unipc"]

# (name, script, argv): "{key}" in an argument is replaced by the path of the input file `key` (see build_inputs).
REQUESTS: list[tuple[str, str, list[str]]] = [
    ("txt2img-ddim-batch", "txt2img", [*V1, "--n_samples", "2"]),
    ("txt2img-ddim-eta", "txt2img", [*V1, "--ddim_eta", "0.5", "--n_samples", "2"]),
    ("txt2img-plms", "txt2img", [*V1, "--plms"]),
    ("txt2img-dpm_solver", "txt2img", [*V1, "--dpm_solver"]),
    *[(f"txt2img-{name}", "txt2img", [*V1, "--sampler", name]) for name in K_SAMPLERS],
    ("txt2img-dpmpp_2m_karras-batch", "txt2img", [*V1, "--sampler", "dpmpp_2m_karras", "--n_samples", "2"]),
    ("txt2img-euler_a_karras", "txt2img", [*V1, "--sampler", "euler_a_karras"]),
    ("txt2img-dpmpp_sde_karras", "txt2img", [*V1, "--sampler", "DPM++ SDE Karras"]),
    ("txt2img-unipc_karras", "txt2img", [*V1, "--sampler", "unipc_karras"]),
    ("txt2img-fixed_code", "txt2img", [*V1, "--n_samples", "2", "--n_iter", "2", "--fixed_code"]),
    ("txt2img-from_file", "txt2img", [*V1, "--from-file", "{prompts}", "--n_samples", "2"]),
    ("txt2img-negative", "txt2img", [*V1, "--negative_prompt", "a green square", "--scale", "4",
                                     "--sampler", "euler"]),
    ("txt2img-prompt_weighting", "txt2img", [*V1, "--prompt", "a (red:1.4) circle on a [blue] background BREAK "
                                             + "shiny, " * 40 + "((glow))", "--negative_prompt", "(green:1.2)",
                                             "--prompt_weighting"]),
    ("txt2img-memory_flags", "txt2img", [*V1, "--n_samples", "2", "--attention_slicing", "--vae_tiling",
                                         "--vae_slicing"]),
    ("txt2img-lora", "txt2img", [*V1, "--lora", "{lora}:0.7", "--sampler", "euler_a"]),
    ("txt2img-embeddings", "txt2img", [*V1, "--embeddings", "{embeddings}", "--prompt", "a portrait, my-style",
                                       "--negative_prompt", "easyneg"]),
    ("txt2img-controlnet", "txt2img", [*V1, "--controlnet", "{controlnet}", "--control_image", "{control_image}",
                                       "--control_scale", "0.8"]),
    ("txt2img-v2-v-ddim", "txt2img", [*V2_V, "--n_samples", "2"]),
    ("txt2img-v2-v-euler_a", "txt2img", [*V2_V, "--sampler", "euler_a"]),
    ("txt2img-shapes", "txt2img", ["--ckpt", "{shapes}", "--config", "{shapes_config}", "--H", "32", "--W", "32",
                                   "--f", "4", "--ddim_steps", "4", "--n_iter", "1", "--n_samples", "2",
                                   "--skip_grid", "--seed", "3", "--prompt", "a yellow triangle on a black background"]),
    ("txt2img-sdxl-euler", "txt2img", [*XL, "--sampler", "euler", "--negative_prompt", "blurry", "--n_samples", "2"]),
    ("txt2img-sdxl-ddim", "txt2img", [*XL]),
    ("txt2img-sdxl-refiner", "txt2img", [*XL, "--sampler", "euler", "--ddim_steps", "4", "--refiner", "{refiner}",
                                         "--refiner_switch", "0.6", "--H", "64", "--W", "64", "--n_samples", "1"]),
    ("img2img-ddim", "img2img", ["--ckpt", "{v1}", "--config", "{v1_config}", *IMAGE, "--strength", "0.5",
                                 "--n_samples", "2"]),
    ("img2img-euler_a", "img2img", ["--ckpt", "{v1}", "--config", "{v1_config}", *IMAGE, "--strength", "0.75",
                                    "--sampler", "euler_a"]),
    ("img2img-sdxl-refiner", "img2img", ["--ckpt", "{refiner}", *IMAGE, "--init-img", "{init64}", "--strength", "0.5",
                                         "--sampler", "euler"]),
    ("inpaint-blend-ddim", "inpaint", ["--ckpt", "{v1}", "--config", "{v1_config}", *IMAGE, "--mask", "{mask}",
                                       "--n_samples", "2"]),
    ("inpaint-blend-euler", "inpaint", ["--ckpt", "{v1}", "--config", "{v1_config}", *IMAGE, "--mask", "{mask}",
                                        "--strength", "0.75", "--sampler", "euler"]),
    ("inpaint-model-ddim", "inpaint", ["--ckpt", "{inpainting}", "--config", "{inpainting_config}", *IMAGE,
                                       "--mask", "{mask}", "--n_samples", "2"]),
    ("inpaint-model-plms", "inpaint", ["--ckpt", "{inpainting}", "--config", "{inpainting_config}", *IMAGE,
                                       "--mask", "{mask}", "--plms"]),
    ("upscale-ddim", "upscale", ["--ckpt", "{upscaler}", "--config", "{upscaler_config}", "--init-img", "{low}",
                                 "--prompt", PROMPT, "--ddim_steps", "4", "--noise_level", "30", "--seed", "5",
                                 "--n_samples", "2", "--skip_grid", "--precision", "full"]),
    ("upscale-euler_a", "upscale", ["--ckpt", "{upscaler}", "--config", "{upscaler_config}", "--init-img", "{low}",
                                    "--ddim_steps", "4", "--sampler", "euler_a", "--seed", "6", "--skip_grid",
                                    "--precision", "full"]),
]

PROMPT_FILE = "\n".join([
    "# prompts with their own settings",
    "a blue square on a red background",
    json.dumps({"prompt": "a green cross", "seed": 1000, "scale": 3, "steps": 2, "sampler": "euler_a",
                "negative_prompt": "red"}),
    json.dumps({"prompt": "a tall white circle", "H": 48, "eta": 0.3}),
    "",
    "a black triangle",
]) + "\n"


def build_inputs(folder: Path) -> dict[str, str]:
    """Every file the requests name, written under `folder` from fixed seeds; {key: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "v1": make_tiny_checkpoint(folder / "tiny-v1.ckpt", "v1"),
        "v1_config": TEST_CONFIGS / "tiny-v1.yaml",
        "v2": make_tiny_checkpoint(folder / "tiny-v2.safetensors", "v2", seed=4),
        "v2_v_config": folder / "tiny-v2-v.yaml",
        "inpainting": make_tiny_checkpoint(folder / "tiny-v1-inpainting.ckpt", "v1-inpainting", seed=1),
        "inpainting_config": TEST_CONFIGS / "tiny-v1-inpainting.yaml",
        "upscaler": make_tiny_checkpoint(folder / "tiny-x4-upscaler.ckpt", "x4-upscaling", seed=2),
        "upscaler_config": TEST_CONFIGS / "tiny-x4-upscaling.yaml",
        "xl": make_tiny_xl_checkpoint(folder / "tiny-xl.safetensors", "xl", seed=3),
        "xl_config": TEST_CONFIGS / "tiny-xl.yaml",
        "refiner": make_tiny_xl_checkpoint(folder / "tiny-refiner.safetensors", "xl-refiner", seed=3),
        "shapes": ROOT / "models" / "shapes" / "shapes.safetensors",
        "shapes_config": ROOT / "models" / "shapes" / "shapes.yaml",
        "controlnet": make_tiny_controlnet(folder / "control_tiny.pth"),
        "control_image": folder / "edges.png",
        "lora": folder / "style.safetensors",
        "embeddings": folder / "embeddings",
        "init": folder / "init.png",
        "init64": folder / "init64.png",
        "mask": folder / "mask.png",
        "low": folder / "low.png",
        "prompts": folder / "prompts.txt",
    }
    # configs the scripts find beside their files, as ControlNet 1.1 and a refiner ship them
    shutil.copy(TEST_CONFIGS / "tiny-xl-refiner.yaml", folder / "tiny-refiner.yaml")
    shutil.copy(TEST_CONFIGS / "tiny-cldm-v1.yaml", folder / "control_tiny.yaml")
    (folder / "tiny-v2-v.yaml").write_text((TEST_CONFIGS / "tiny-v2.yaml").read_text(encoding="utf-8").replace(
        "  params:\n", '  params:\n    parameterization: "v"\n', 1), encoding="utf-8")
    write_lora(paths["lora"], read_checkpoint(paths["v1"])[0])
    paths["embeddings"].mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(6)
    write_checkpoint({"emb_params": torch.randn(3, 32, generator=generator) * 3},
                     paths["embeddings"] / "my-style.safetensors")
    write_checkpoint({"emb_params": torch.randn(1, 32, generator=generator) * 3},
                     paths["embeddings"] / "easyneg.safetensors")
    control = torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(9))
    Image.fromarray((control.numpy() * 255).astype(np.uint8)).save(paths["control_image"])
    smooth_image(40, 36).save(paths["init"])  # resized down to 32x32, the tiny models' multiple of 16
    smooth_image(64, 64, seed=2).save(paths["init64"])  # the tiny refiner's UNet halves latents three times
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:16] = 255  # white repaints; edges on the 8-pixel latent grid
    Image.fromarray(mask).save(paths["mask"])
    smooth_image(8, 8, seed=1).save(paths["low"])
    paths["prompts"].write_text(PROMPT_FILE, encoding="utf-8")
    return {key: str(path) for key, path in paths.items()}


def run_request(script: str, argv: list[str], inputs: dict[str, str], outdir: Path) -> dict[str, np.ndarray]:
    """Run `script`'s main on `argv` (placeholders filled in) into `outdir`; {file name: uint8 pixels} of its
    samples."""
    status = SCRIPTS[script]([arg.format_map(inputs) for arg in argv] + ["--outdir", str(outdir)])
    assert status == 0, f"{script} {' '.join(argv)} exited with status {status}"
    images = {}
    for path in sorted((outdir / "samples").glob("*.png")):
        with Image.open(path) as image:
            images[path.name] = np.asarray(image.convert("RGB")).copy()
    return images


def record(path: Path) -> None:
    """Run every request in a temporary folder and write their pixels to `path`."""
    torch.set_num_threads(1)
    arrays = {}
    with tempfile.TemporaryDirectory() as folder:
        os.environ["XDG_CACHE_HOME"] = str(Path(folder) / "cache")  # model hashes are cached there
        inputs = build_inputs(Path(folder) / "inputs")
        for name, script, argv in REQUESTS:
            for file_name, pixels in run_request(script, argv, inputs, Path(folder) / name).items():
                arrays[f"{name}/{file_name}"] = pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, arrays)
    print(f"{path}: {len(arrays)} images from {len(REQUESTS)} requests, made by {ldm.__file__}")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """The file np.savez_compressed writes, with fixed entry dates: recording the same pixels again gives the same
    bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as file:
                np.lib.format.write_array(file, np.asanyarray(array), allow_pickle=False)


# --- the test --------------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as recorded:
        return {key: recorded[key] for key in recorded.files}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    return build_inputs(tmp_path_factory.mktemp("golden-inputs"))


def test_every_request_is_recorded(golden):
    assert sorted({key.split("/")[0] for key in golden}) == sorted(name for name, _, _ in REQUESTS)


@pytest.mark.parametrize("name, script, argv", REQUESTS, ids=[name for name, _, _ in REQUESTS])
def test_pixels_equal_the_recorded_ones(golden, inputs, tmp_path, monkeypatch, capsys, name, script, argv):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images = run_request(script, argv, inputs, tmp_path / "out")
    capsys.readouterr()
    expected = sorted(key.split("/", 1)[1] for key in golden if key.split("/")[0] == name)
    assert sorted(images) == expected, f"{name}: wrote {sorted(images)}, recorded {expected}"
    for file_name, pixels in images.items():
        recorded = golden[f"{name}/{file_name}"]
        assert pixels.shape == recorded.shape, f"{name}/{file_name}: shape {pixels.shape}, recorded {recorded.shape}"
        difference = np.abs(pixels.astype(int) - recorded.astype(int)).max()
        assert np.array_equal(pixels, recorded), f"{name}/{file_name}: pixels differ by up to {difference}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, required=True, metavar="NPZ", help="write the fixture here")
    record(parser.parse_args().record)
