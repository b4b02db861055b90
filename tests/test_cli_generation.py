"""Failure handling while generating: out-of-memory retries, NaN/black fp16 decodes, grids, interrupted runs."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ldm.pipeline.decoding import GenerationError, decode_to_pixels, run_in_sub_batches
from ldm.cli.images import make_grid
from ldm.pipeline.decoding import to_uint8


def out_of_memory() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_retries_in_halves_and_keeps_the_order():
    attempts, retries = [], []

    def run(items):
        attempts.append(list(items))
        if len(items) > 2:
            raise out_of_memory()
        return np.array(items)

    result = run_in_sub_batches(run, [1, 2, 3, 4, 5], lambda size, half: retries.append((size, half)), lambda: "")
    assert np.concatenate(result).tolist() == [1, 2, 3, 4, 5]
    assert attempts == [[1, 2, 3, 4, 5], [1, 2, 3], [1, 2], [3], [4, 5]]
    assert retries == [(5, 3), (3, 2)]


def test_out_of_memory_for_a_single_image_says_which_flags_help():
    def run(items):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)")

    with pytest.raises(GenerationError, match="lower --H/--W"):
        run_in_sub_batches(run, ["a", "b"], lambda size, half: None, lambda: "lower --H/--W")


def test_other_errors_are_not_retried():
    def run(items):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_in_sub_batches(run, [1, 2], lambda size, half: None, lambda: "")


class FakeAutoencoderModel(nn.Module):
    """Decodes to NaN in half precision (as fp16 SD VAEs can overflow) and to a fixed image in fp32."""

    def __init__(self, nan_in_fp32: bool = False):
        super().__init__()
        self.first_stage_model = nn.Linear(1, 1).half()
        self.nan_in_fp32 = nan_in_fp32
        self.decoded_dtypes = []

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        dtype = self.first_stage_model.weight.dtype
        assert z.dtype == dtype  # latents must follow the autoencoder's dtype
        self.decoded_dtypes.append(dtype)
        image = torch.full((z.shape[0], 3, 8, 8), 0.5, dtype=dtype)
        if dtype == torch.float16 or self.nan_in_fp32:
            image[:, :, 0, 0] = float("nan")
        return image


def test_nan_from_an_fp16_autoencoder_is_decoded_again_in_fp32():
    model, notes = FakeAutoencoderModel(), []
    pixels = decode_to_pixels(model, torch.zeros(2, 4, 1, 1, dtype=torch.float16), notes.append)
    assert model.decoded_dtypes == [torch.float16, torch.float32]
    assert model.first_stage_model.weight.dtype == torch.float32  # and stays fp32 for the rest of the run
    assert pixels.shape == (2, 8, 8, 3) and (pixels == int(255 * 0.75)).all()
    assert notes == ["the half-precision autoencoder gave NaN/black images: decoding again in fp32 (and from now on)"]
    decode_to_pixels(model, torch.zeros(1, 4, 1, 1, dtype=torch.float16), notes.append)
    assert model.decoded_dtypes[-1] == torch.float32 and len(notes) == 1


def test_nan_that_fp32_cannot_fix_is_an_error_not_a_black_image():
    with pytest.raises(GenerationError, match="NaN even in fp32"):
        decode_to_pixels(FakeAutoencoderModel(nan_in_fp32=True), torch.zeros(1, 4, 1, 1), lambda text: None)
    latents = torch.zeros(1, 4, 1, 1)
    latents[0, 0, 0, 0] = float("inf")
    with pytest.raises(GenerationError, match="NaN/inf latents in float32, so precision is not the cause: the "
                                              "checkpoint, --vae, --lora or --embeddings file may be damaged"):
        decode_to_pixels(FakeAutoencoderModel(), latents, lambda text: None)
    with pytest.raises(GenerationError, match="NaN/inf latents in float16: run with --precision full"):
        decode_to_pixels(FakeAutoencoderModel(), latents.half(), lambda text: None)


def test_to_uint8_truncates_like_compvis_and_grid_matches_torchvision_layout():
    images = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.5]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(images)[0, 0, :, 0].tolist() == [0, 63, 127, 254, 255]
    rng = np.random.default_rng(0)
    tiles = [rng.integers(1, 256, (4, 6, 3), dtype=np.uint8) for _ in range(5)]
    grid = make_grid(tiles, per_row=2)
    assert grid.shape == (3 * 6 + 2, 2 * 8 + 2, 3)
    assert np.array_equal(grid[2 + 6: 2 + 6 + 4, 2 + 8: 2 + 8 + 6], tiles[3])
    assert np.array_equal(grid[2 + 12: 2 + 12 + 4, 2: 2 + 6], tiles[4])
    assert grid[2 + 12:, 2 + 8:].max() == 0  # the empty last cell stays black
    assert (grid > 0).sum() == sum((tile > 0).sum() for tile in tiles)


@pytest.fixture
def cli(tiny_checkpoint, tiny_config, tmp_path, capsys, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def run(*flags, outdir):
        from ldm.cli.txt2img import main
        base = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--H", "32", "--W", "32",
                "--ddim_steps", "2", "--n_iter", "1", "--outdir", str(outdir)]
        status = main(base + [str(flag) for flag in flags])
        return status, capsys.readouterr().err
    yield run
    torch.set_num_threads(threads)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def nearly_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal but for the odd pixel one level apart (float rounding of other batch sizes crossing a uint8 step)."""
    difference = np.abs(a.astype(int) - b.astype(int))
    return difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_simulated_out_of_memory_gives_the_same_images_in_sub_batches(cli, tmp_path, monkeypatch):
    from ldm.pipeline import Pipeline

    assert cli("--n_samples", 4, "--skip_grid", outdir=tmp_path / "plain")[0] == 0
    real = Pipeline.render
    sizes = []

    def tight_memory(self, request, warm_up=False):
        sizes.append(request.batch_size)
        if request.batch_size > 1:
            raise out_of_memory()
        return real(self, request, warm_up)

    monkeypatch.setattr(Pipeline, "render", tight_memory)
    status, err = cli("--n_samples", 4, "--skip_grid", outdir=tmp_path / "tight")
    assert status == 0 and sizes == [4, 2, 1, 1, 2, 1, 1]
    assert "out of memory with a batch of 4: retrying in sub-batches of 2" in err
    for index in range(4):  # the same images: each has its own noise; only float rounding differs across batch sizes
        name = f"samples/{index:05d}.png"
        assert nearly_equal(pixels(tmp_path / "plain" / name), pixels(tmp_path / "tight" / name))

    monkeypatch.setattr(Pipeline, "render", lambda self, request, warm_up=False: (_ for _ in ()).throw(out_of_memory()))
    status, err = cli("--n_samples", 2, outdir=tmp_path / "none")
    assert status == 1 and ("error: out of memory on cpu while sampling one 32x32 image: try --attention_slicing, "
                            "--offload model, --offload sequential, --bf16 or a smaller --H/--W than 32x32") in err
    assert "Traceback" not in err and not list((tmp_path / "none").rglob("*.png"))  # no image, the failure recorded
    assert '"status": "failed"' in (tmp_path / "none" / "manifest.jsonl").read_text()


def test_interrupted_run_leaves_every_earlier_file_complete(cli, tmp_path, monkeypatch):
    import ldm.cli.job as job

    out = tmp_path / "out"
    assert cli("--n_samples", 1, outdir=out)[0] == 0
    before = {path.name: path.read_bytes() for path in (out / "samples").iterdir()}
    real_encode, encoded = job.encode_png, []

    def killed_on_the_third(*args):
        encoded.append(1)
        if len(encoded) == 3:
            raise KeyboardInterrupt
        return real_encode(*args)

    monkeypatch.setattr(job, "encode_png", killed_on_the_third)
    status, err = cli("--n_samples", 2, "--n_iter", 2, outdir=out)
    assert status == 130 and "interrupted; 2 file(s) were saved completely" in err
    names = sorted(path.name for path in (out / "samples").iterdir())
    assert names == ["00000.png", "00000.yaml", "00001.png", "00001.yaml", "00002.png", "00002.yaml"]
    assert all((out / "samples" / name).read_bytes() == data for name, data in before.items())
    for name in ("00001.png", "00002.png"):
        with Image.open(out / "samples" / name) as image:
            image.load()
    assert sorted(path.name for path in out.iterdir()) == ["grid-0000.png", "grid-0000.yaml", "manifest.jsonl",
                                                           "samples"]
    monkeypatch.setattr(job, "encode_png", real_encode)
    assert cli(outdir=out)[0] == 0
    assert (out / "samples/00003.png").exists() and (out / "grid-0001.png").exists()


def test_safety_checker_replaces_flagged_images_and_logs_them(cli, tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(text_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                     "num_attention_heads": 2},
                        vision_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                        projection_dim=8)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # every concept threshold below any cosine similarity: every image is flagged
        checker.concept_embeds_weights.fill_(-2.0)
    folder = tmp_path / "checker"
    checker.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    status, err = cli("--n_samples", 2, "--safety_checker", folder, outdir=tmp_path / "out")
    assert status == 0, err
    for index in range(2):
        path = tmp_path / "out" / "samples" / f"{index:05d}.png"
        assert pixels(path).max() == 0
        assert f"{path}: flagged by the safety checker, replaced by a black image" in err
    assert cli("--n_samples", 1, outdir=tmp_path / "unchecked")[0] == 0
    assert pixels(tmp_path / "unchecked/samples/00000.png").max() > 0


def test_unwritable_output_is_one_line(cli, tmp_path, monkeypatch):
    import errno

    import ldm.cli.outputs as outputs

    def disk_full(directory, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_write_temporary", disk_full)
    status, err = cli("--n_samples", 1, outdir=tmp_path / "out")
    assert status == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"txt2img.py: error: cannot write to {tmp_path / 'out'}: No space left on "
                                            f"device; free some space or pick another --outdir")
