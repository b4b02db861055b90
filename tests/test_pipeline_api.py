"""`ldm.pipeline` from Python: the same pixels and metadata as the scripts for the same request, requests checked when
they are made, add-ons composed from code, and the package layout the redesign promises (the CLI holds no
generation logic; no pipeline function runs past 50 lines)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from image_files import pixels, sidecar
from ldm.cli.img2img import main as img2img_main
from ldm.cli.txt2img import main as txt2img_main
from ldm.pipeline import InitImage, Pipeline, Request, UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint, tiny_config):
    return Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), device="cpu", precision="full")


def cli_flags(tiny_checkpoint, tiny_config, outdir, *flags):
    return ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--H", "32", "--W", "32", "--n_iter", "1",
            "--skip_grid", "--precision", "full", "--outdir", str(outdir), *map(str, flags)]


@pytest.mark.parametrize("sampler, flags", [("ddim", ()), ("euler_a", ("--sampler", "euler_a")),
                                            ("dpmpp_2m_karras", ("--sampler", "DPM++ 2M Karras"))])
def test_python_and_the_script_make_the_same_pixels_and_records(pipeline, tiny_checkpoint, tiny_config, tmp_path,
                                                                 monkeypatch, sampler, flags):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = cli_flags(tiny_checkpoint, tiny_config, tmp_path / "out", "--prompt", "a red circle", "--negative_prompt",
                     "blurry", "--seed", 11, "--n_samples", 2, "--ddim_steps", 4, *flags)
    assert txt2img_main(argv) == 0
    result = pipeline(Request("a red circle", "blurry", seed=11, batch_size=2, steps=4, sampler=sampler,
                              height=32, width=32))
    assert result.pixels.shape == (2, 32, 32, 3) and result.latents.shape == (2, 4, 4, 4)
    for index in range(2):
        saved = tmp_path / "out" / "samples" / f"{index:05d}.png"
        assert np.array_equal(result.pixels[index], pixels(saved)), (sampler, index)
        assert np.array_equal(np.asarray(result.images[index]), pixels(saved))
        assert result.records[index].to_mapping() == sidecar(saved)


def test_an_init_image_add_on_from_code_equals_img2img(tiny_checkpoint, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "init.png")
    argv = cli_flags(tiny_checkpoint, tiny_config, tmp_path / "out", "--prompt", "a cat", "--init-img",
                     tmp_path / "init.png", "--strength", 0.5, "--ddim_steps", 4, "--n_samples", 1, "--sampler",
                     "euler", "--no_metadata")
    assert img2img_main(argv) == 0
    with Image.open(tmp_path / "init.png") as image:
        addon = InitImage(image.convert("RGB"), strength=0.5)
    pipeline = Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), precision="full", addons=[addon],
                                        hash_files=False)
    result = pipeline(Request("a cat", seed=42, steps=4, sampler="euler", scale=5.0, height=32, width=32))
    assert np.array_equal(result.pixels[0], pixels(tmp_path / "out" / "samples" / "00000.png"))
    assert result.steps == 2 and result.records[0].to_mapping()["strength"] == 0.5


def test_the_model_size_fills_a_request_without_one(pipeline):
    completed = pipeline.complete(Request("a cat", steps=1))
    assert completed.size == (64, 64)  # tests/configs/tiny-v1.yaml: image_size 8, f 8
    assert pipeline(Request("a cat", steps=1, height=32, width=64)).pixels.shape == (1, 32, 64, 3)


def test_a_batch_that_runs_out_of_memory_is_made_in_halves_with_the_same_images(pipeline, monkeypatch):
    request = Request(["one", "two", "three"], seeds=[5, 6, 7], steps=2, height=32, width=32, sampler="euler")
    whole = pipeline(request)
    real, sizes = Pipeline.render, []

    def tight(self, batch, warm_up=False):
        sizes.append(batch.batch_size)
        if batch.batch_size > 1:
            raise torch.OutOfMemoryError("out of memory")
        return real(self, batch, warm_up)

    monkeypatch.setattr(Pipeline, "render", tight)
    split = pipeline(request)
    assert sizes == [3, 2, 1, 1, 1]
    assert [record.seed for record in split.records] == [5, 6, 7] and split.latents.shape[0] == 3
    assert np.abs(split.pixels.astype(int) - whole.pixels.astype(int)).max() <= 1


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, "steps 0 is out of range"),
    ({"height": 30, "width": 32}, "H 30 is not a positive multiple of 8"),
    ({"seed": -1}, "seed -1 is out of range"),
    ({"sampler": "nonsense"}, "unknown sampler 'nonsense'"),
    ({"sampler": "euler", "eta": 0.5}, "euler is deterministic and takes no eta"),
    ({"prompt": ["a", "b"], "seeds": [1, 2, 3]}, "expected one text or 3 texts"),
    ({"scale": float("nan")}, "scale nan is not a finite number"),
])
def test_requests_are_checked_when_made(changes, message):
    values = {"prompt": "a cat", "height": 32, "width": 32, **changes}
    with pytest.raises(UsageError, match=message):
        Request(**values)


def test_requests_are_frozen_and_normalised():
    request = Request("a cat", seed=7, batch_size=3, sampler="Euler a", eta=0.0)
    assert request.seeds == (7, 8, 9) and request.prompts == ("a cat",) * 3 and request.sampler == "euler_a"
    assert request.eta == 0.0 and Request("a cat", sampler="euler", eta=0).eta is None
    with pytest.raises(AttributeError):
        request.steps = 3  # type: ignore[misc]
    subset = request.subset([2])
    assert subset.seeds == (9,) and subset.batch_size == 1 and request.replace(seed=1).seeds == (1, 2, 3)


def test_a_sampler_the_model_cannot_take_is_refused_before_loading(tiny_checkpoint, tiny_config, monkeypatch):
    import ldm.pipeline.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(UsageError, match="sizes must be multiples of 16"):
        Pipeline.check(str(tiny_checkpoint), str(tiny_config), requests=[Request("a", height=40, width=32)])


# --- the layout the redesign promises ---------------------------------------------------------------------------------
GENERATION_MODULES = ("ldm.models", "ldm.modules", "ldm.optimize", "ldm.lora", "ldm.textual_inversion",
                      "ldm.controlnet", "ldm.loading")
# what the scripts may still take from below the pipeline: names and step counts for flags and messages
ALLOWED_IN_CLI = {"ldm.models.diffusion.samplers": {"available_samplers", "img2img_steps"},
                  "ldm.modules.encoders.clip_tokenizer": {"CLIPTokenizer"},
                  "ldm.modules.encoders.prompt_weighting": {"has_weighting_syntax", "parse_prompt_attention"},
                  "ldm.loading": {"LoadError", "load_config", "resolve_config"}}


def imports_of(path: Path) -> list[tuple[str, set[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, {alias.name for alias in node.names}))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, set()) for alias in node.names)
    return found


def test_the_scripts_hold_no_generation_logic():
    """ldm/cli turns flags into requests and add-ons and writes files: it imports no sampler, model, encoder or
    optimisation beyond the names its flags and messages need."""
    offending = []
    for path in sorted((ROOT / "ldm" / "cli").glob("*.py")):
        for module, names in imports_of(path):
            if module.startswith(GENERATION_MODULES) and not names <= ALLOWED_IN_CLI.get(module, set()):
                offending.append(f"{path.name}: {module} {sorted(names - ALLOWED_IN_CLI.get(module, set()))}")
    assert not offending, offending


def test_no_pipeline_function_runs_past_50_lines():
    long = []
    for path in sorted((ROOT / "ldm" / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length >= 50:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_a_size_the_refiner_cannot_take_is_refused_before_loading(tiny_xl_checkpoints, tmp_path, monkeypatch):
    """The tiny base takes 32x32, its refiner (a deeper UNet) only multiples of 64: refused up front, not mid-run."""
    import ldm.pipeline.pipeline as pipeline_module
    from ldm.pipeline import Refiner

    import shutil

    from checkpoint_factory import TEST_CONFIGS

    monkeypatch.setattr(pipeline_module, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    shutil.copy(tiny_xl_checkpoints["xl-refiner"], tmp_path / "tiny-refiner.safetensors")
    shutil.copy(TEST_CONFIGS / "tiny-xl-refiner.yaml", tmp_path / "tiny-refiner.yaml")  # found beside the file
    refiner = Refiner(str(tmp_path / "tiny-refiner.safetensors"))
    base = str(tiny_xl_checkpoints["xl"]), str(TEST_CONFIGS / "tiny-xl.yaml")
    with pytest.raises(UsageError, match=r"--refiner .*: H 32 does not fit this model: sizes must be multiples of 64"):
        Pipeline.check(*base, addons=[refiner], requests=[Request("a", sampler="euler", height=32, width=32)])
    Pipeline.check(*base, addons=[refiner], requests=[Request("a", sampler="euler", height=64, width=64)])


def test_a_request_from_an_images_infotext_makes_that_image_again(pipeline, tmp_path):
    from ldm.pipeline.metadata import parameters_text

    request = Request("a blue square", "red, (dull:1.2)", seed=1234, steps=3, sampler="euler_a", scale=6.5,
                      height=32, width=64, eta=0.5, prompt_weighting=True)
    made = pipeline(request)
    again = Request.from_infotext(parameters_text(made.records[0]))
    assert again == request
    assert np.array_equal(pipeline(again).pixels, made.pixels)
    with pytest.raises(UsageError, match="infotext: Steps 'x' is not a number"):
        Request.from_infotext("a cat\nSteps: x, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64")
