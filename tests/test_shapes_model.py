"""The shipped shapes model follows prompts: images generated through the real inference path (load_model, a sampler
with classifier-free guidance, the autoencoder) show the asked shape, colour and background colour, as judged by
plain image analysis. Also: the shapes data set is deterministic and varied, and the judge reads its images right."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.data.shapes import COLOURS, SHAPES, ShapesDataset, all_prompts, caption

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = ROOT / "models" / "shapes" / "shapes.safetensors"
SHIPPED_CONFIG = ROOT / "configs" / "latent-diffusion" / "shapes.yaml"
SEEDS = (0, 1, 2, 3)
SAMPLER, STEPS, SCALE = "ddim", 20, 7.5  # chosen on other seeds (100-107: 97.9%), not on these
REQUIRED_ACCURACY = 0.90
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
NAMES = list(COLOURS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompt_grid() -> list[tuple[str, str, str]]:
    """24 (shape, colour, background): every shape in every colour, the backgrounds spread over the palette."""
    grid = []
    for shape_index, shape in enumerate(SHAPES):
        for colour_index, colour in enumerate(NAMES):
            background = NAMES[(colour_index + 1 + (shape_index + colour_index) % (len(NAMES) - 1)) % len(NAMES)]
            grid.append((shape, colour, background))
    return grid


# --- the judge: colours from pixel statistics, the shape from the geometry of the foreground mask ---------------------
def nearest_colour(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(np.linalg.norm(PALETTE - rgb, axis=1)))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (stray specks do not move the bounding box)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    sizes = [0]
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label = len(sizes)
        labels[start] = label
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        sizes.append(size)
    return labels == int(np.argmax(sizes)) if len(sizes) > 1 else mask


def shape_template(shape: str, size: int = 16, supersample: int = 4) -> np.ndarray:
    """Coverage [size, size] in [0, 1] of `shape` filling the unit square, computed analytically."""
    n = size * supersample
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n  # pixel centres in (0, 1)
    if shape == "circle":
        inside = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    elif shape == "square":
        inside = np.ones_like(x, dtype=bool)
    elif shape == "triangle":  # apex at the top centre, base along the bottom
        inside = np.abs(x - 0.5) <= y / 2
    elif shape == "cross":  # arms a third of the side wide
        inside = (np.abs(x - 0.5) <= 1 / 6) | (np.abs(y - 0.5) <= 1 / 6)
    else:
        raise ValueError(shape)
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


TEMPLATES = {shape: shape_template(shape) for shape in SHAPES}


def judge(image: np.ndarray) -> dict:
    """What a uint8 image [H, W, 3] shows: background colour (border pixels), shape colour (pixels far from the
    background) and shape (the best-matching template, by IoU, of the foreground's bounding-box crop)."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3), pixels[:, :2].reshape(-1, 3),
                             pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest_colour(background_rgb)
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    mask = largest_component(distance > 90)
    verdict = {"background": background, "colour": None, "shape": None, "fill": 0.0}
    if mask.sum() < 12:
        return verdict
    verdict["colour"] = nearest_colour(np.median(pixels[mask], axis=0))
    rows, columns = np.nonzero(mask)
    crop = mask[rows.min():rows.max() + 1, columns.min():columns.max() + 1].astype(np.float32)
    verdict["fill"] = float(crop.mean())  # circle ~0.785, square ~1, triangle ~0.5, cross ~0.56
    resized = torch.nn.functional.interpolate(torch.from_numpy(crop)[None, None], size=(16, 16), mode="area")[0, 0]
    resized = resized.numpy()
    scores = {shape: np.minimum(resized, template).sum() / np.maximum(resized, template).sum()
              for shape, template in TEMPLATES.items()}
    verdict["shape"] = max(scores, key=scores.get)
    return verdict


def is_correct(verdict: dict, shape: str, colour: str, background: str) -> bool:
    return (verdict["shape"], verdict["colour"], verdict["background"]) == (shape, colour, background)


# --- the data set and the judge ---------------------------------------------------------------------------------------
def test_shapes_data_set_is_deterministic_and_varied():
    data = ShapesDataset(size=32, length=400, seed=5)
    first = data[7]
    assert torch.equal(first["image"], ShapesDataset(size=32, length=400, seed=5)[7]["image"])
    assert not torch.equal(first["image"], ShapesDataset(size=32, length=400, seed=6)[7]["image"])
    assert first["image"].shape == (3, 32, 32) and first["image"].min() >= -1 and first["image"].max() <= 1
    specs = [data.describe(index) for index in range(len(data))]
    assert first["caption"] == specs[7].caption == caption(specs[7].shape, specs[7].colour, specs[7].background)
    assert all(spec.colour != spec.background for spec in specs)
    for values in ({s.shape for s in specs}, {s.colour for s in specs}, {s.background for s in specs},
                   {round(s.box[2] - s.box[0], 3) for s in specs}, {round(s.box[0], 1) for s in specs}):
        assert len(values) >= 4
    assert len(all_prompts()) == len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1)


def test_judge_reads_the_data_set_correctly():
    data = ShapesDataset(size=32, length=300, seed=11)
    wrong = []
    for index in range(len(data)):
        spec = data.describe(index)
        verdict = judge(np.asarray(data.image(index)))
        if not is_correct(verdict, spec.shape, spec.colour, spec.background):
            wrong.append((spec.caption, verdict))
    assert len(wrong) <= 3, wrong[:5]


def test_judge_rejects_what_is_not_asked():
    data = ShapesDataset(size=32, length=50, seed=3)
    spec = data.describe(0)
    image = np.asarray(data.image(0))
    verdict = judge(image)
    other_shape = next(shape for shape in SHAPES if shape != spec.shape)
    assert not is_correct(verdict, other_shape, spec.colour, spec.background)
    empty = np.zeros_like(image) + np.array(COLOURS[spec.background], dtype=np.uint8)
    assert judge(empty)["shape"] is None


# --- the shipped model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped_model():
    from ldm.loading import load_model

    if not SHIPPED_WEIGHTS.is_file():
        pytest.fail(f"the shipped weights {SHIPPED_WEIGHTS} are missing: they are part of the repository "
                    "(train them with the commands in configs/latent-diffusion/shapes.yaml)")
    return load_model(SHIPPED_WEIGHTS, SHIPPED_CONFIG)


def generate(model, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """uint8 images [N, 32, 32, 3] through the inference path the CLI uses."""
    from ldm.models.diffusion.noise import ImageNoise
    from ldm.models.diffusion.samplers import sample

    with torch.no_grad():
        cond = model.get_learned_conditioning(prompts)
        uncond = model.get_learned_conditioning([""] * len(prompts))
        shape = (len(prompts), model.channels, model.image_size, model.image_size)
        latents = sample(model, SAMPLER, STEPS, shape, cond, uncond, SCALE, ImageNoise(seeds), disable=True)
        images = model.decode_first_stage(latents)
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_shipped_model_follows_prompts(shipped_model):
    grid = [(item, seed) for item in prompt_grid() for seed in SEEDS]
    prompts = [caption(*item) for item, _ in grid]
    images = generate(shipped_model, prompts, [seed for _, seed in grid])
    verdicts = [judge(image) for image in images]
    correct = [is_correct(verdict, *item) for verdict, (item, _) in zip(verdicts, grid)]
    by_part = {part: np.mean([verdict[part] == item[index] for verdict, (item, _) in zip(verdicts, grid)])
               for index, part in enumerate(("shape", "colour", "background"))}
    accuracy = float(np.mean(correct))
    misses = Counter(prompt for prompt, ok in zip(prompts, correct) if not ok)
    print(f"\nshapes model prompt following: {sum(correct)}/{len(correct)} = {accuracy:.1%} correct "
          f"({len(prompt_grid())} prompts x {len(SEEDS)} seeds, {SAMPLER} {STEPS} steps, scale {SCALE}); "
          + ", ".join(f"{part} {value:.1%}" for part, value in by_part.items())
          + (f"; missed most: {misses.most_common(3)}" if misses else ""))
    assert accuracy >= REQUIRED_ACCURACY
