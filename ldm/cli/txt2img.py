"""`scripts/txt2img.py`: flags to a checked plan of requests and add-ons, `ldm.pipeline` to make them, numbered files.

Nothing is written and no weight is read before every request and add-on is checked. img2img, inpaint and upscale
are this shell with one more add-on (`Shell.sampling_addon`) and their own flags.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from ldm.checkpoints import CheckpointError
from ldm.cli.arguments import check_counts, lora_specs, parse_args
from ldm.cli.images import MissingDependency, Watermarker, make_grid
from ldm.cli.outputs import GRID_DIGITS, SAMPLE_DIGITS, next_grid_number, next_sample_number, write_new_files
from ldm.cli.plan import (RunPlan, apply_compat_flags, check_files, fill_model_defaults, peek_config, plan_batches,
                          read_jobs)
from ldm.cli.prompts import PromptFileError
from ldm.cli.safety import SafetyChecker
from ldm.cli.summary import RunSummary
from ldm.loading import LoadError
from ldm.pipeline import AddOn, ControlNet, Embeddings, Loras, Options, Pipeline, Refiner
from ldm.pipeline.addons.refiner import DEFAULT_SWITCH
from ldm.pipeline.decoding import black_images
from ldm.pipeline.errors import GenerationError, UsageError
from ldm.pipeline.metadata import ImageRecord, check_made_by, encode_png, parameters_text, sidecar_text
from ldm.pipeline.model_info import check_latent_flags

PROG = "txt2img.py"


def options_from_flags(opt: argparse.Namespace) -> Options:
    return Options(use_ema=True if opt.ema else None, v_prediction=opt.v_prediction or None, vae=opt.vae,
                   offload=opt.offload, attention_slicing=opt.attention_slicing, vae_tiling=opt.vae_tiling,
                   vae_slicing=opt.vae_slicing, compile=opt.compile, cuda_graphs=opt.cuda_graphs,
                   hash_files=not opt.no_metadata)


class Shell:
    """One run of a script: its flags, the checked plan and add-ons (all before the model loads), the pipeline, and
    the files it writes. Subclasses add their sampling add-on (`sampling_addon`) and adjust flags first
    (`prepare`)."""

    prog = PROG

    def __init__(self, opt: argparse.Namespace):
        started = time.perf_counter()
        apply_compat_flags(opt)
        self.prepare(opt)
        fill_model_defaults(opt, peek_config(opt))
        check_counts(opt)
        self.opt = opt
        self.plan: RunPlan = plan_batches(opt, read_jobs(opt))
        self.recorded = self.plan.source_info  # what a --metadata_from image records
        if opt.metadata_from:
            try:
                check_made_by(self.recorded, opt.metadata_from, self.prog)
            except ValueError as error:
                raise UsageError(str(error)) from None
        check_files(opt)
        self.loras = Loras(lora_specs(opt.lora))
        self.embeddings = Embeddings(opt.embeddings)
        if opt.metadata_from and self.recorded.get("prompt_weighting"):
            opt.prompt_weighting = True  # the recorded image read its prompts with weights
        self.requests = self.plan.requests(opt.prompt_weighting)
        self.addons = self.make_addons()
        self.setup = Pipeline.check(opt.ckpt, opt.config, opt.device, opt.precision, addons=self.addons,
                                    requests=self.requests, options=options_from_flags(opt), note=self.note,
                                    info=info)
        check_latent_flags(opt.f, opt.C, self.setup.config)
        self.watermarker = Watermarker() if opt.watermark else None
        self.safety_checker = self.make_safety_checker()
        self.summary = RunSummary(self.setup.device, self.setup.dtype, started=started)
        self.sample_dir = Path(opt.outdir) / "samples"
        self.next_sample: int | None = None  # found when the first image is saved: nothing is written before
        self.saved: list[Path] = []
        self.watermark_failed = False

    # --- flags to add-ons ------------------------------------------------------------------------------------------
    def prepare(self, opt: argparse.Namespace) -> None:
        """Adjust the flags before the plan is made (img2img: the size from the init image)."""

    def sampling_addon(self) -> AddOn | None:
        """The add-on that decides how latents are made (none: from noise, or the refiner's hand-off)."""
        return self.refiner_addon()

    def make_addons(self) -> list[AddOn]:
        addons: list[AddOn] = [self.loras, self.embeddings]
        sampling = self.sampling_addon()
        controlnet = self.controlnet_addon()
        return addons + [addon for addon in (sampling, controlnet) if addon is not None]

    def refiner_addon(self) -> Refiner | None:
        opt = self.opt
        if opt.refiner is None:
            if opt.refiner_switch is not None:
                raise UsageError(f"--refiner_switch {opt.refiner_switch} needs --refiner (an SDXL refiner file)")
            if opt.metadata_from and self.recorded.get("refiner"):
                self.note(f"{opt.metadata_from} was finished by the refiner {self.recorded['refiner']}: pass "
                          f"--refiner with that file to make the same image (its switch is taken from the metadata)")
            return None
        recorded = self.recorded.get("refiner_switch", DEFAULT_SWITCH)  # --metadata_from a hand-off image
        return Refiner(opt.refiner, recorded if opt.refiner_switch is None else opt.refiner_switch)

    def controlnet_addon(self) -> ControlNet | None:
        opt, recorded = self.opt, self.recorded
        if opt.controlnet is None:
            if recorded.get("controlnet"):
                self.note(f"{opt.metadata_from} was steered by the ControlNet {recorded['controlnet']} with the "
                          f"control image {recorded.get('control_image')}: pass --controlnet and --control_image "
                          f"with those files to make the same image (its scale is taken from the metadata)")
            for flag, value in (("--control_image", opt.control_image), ("--control_scale", opt.control_scale)):
                if value is not None:
                    raise UsageError(f"{flag} needs --controlnet (a ControlNet file such as "
                                     f"control_v11p_sd15_canny.pth)")
            return None
        if self.prog != PROG:
            raise UsageError(f"--controlnet works with txt2img.py only; {self.prog} does not take it yet")
        scale = float(recorded.get("control_scale", 1.0)) if opt.control_scale is None else opt.control_scale
        return ControlNet(opt.controlnet, opt.control_image, scale, recorded)

    def make_safety_checker(self) -> Any:
        if not self.opt.safety_checker:
            return None
        try:
            return SafetyChecker(self.opt.safety_checker)
        except (OSError, ValueError) as error:
            raise UsageError(f"--safety_checker {self.opt.safety_checker} cannot be loaded: "
                             f"{str(error).strip().splitlines()[0]}") from None

    # --- messages --------------------------------------------------------------------------------------------------
    def note(self, message: str) -> None:
        print(f"{self.prog}: note: {message}", file=sys.stderr, flush=True)

    def note_recorded_differences(self) -> None:
        """--metadata_from: name what this run does differently from the recorded image."""
        opt, recorded = self.opt, self.recorded
        if not opt.metadata_from:
            return
        model_hash = self.pipeline.model_hash
        if recorded.get("model_hash") and model_hash and recorded["model_hash"] != model_hash:
            self.note(f"{opt.metadata_from} was made with model hash {recorded['model_hash']}, this checkpoint is "
                      f"{model_hash}: the image will differ")
        if recorded.get("lora") != self.loras.text:
            self.note(f"{opt.metadata_from} was made with LoRA {recorded.get('lora') or 'none'}, this run uses "
                      f"{self.loras.text or 'none'}: the image will differ")
        missing = self.embeddings.missing(recorded.get("embeddings"))
        if missing:
            self.note(f"{opt.metadata_from} was made with the embeddings {', '.join(missing)}, which this run does "
                      f"not load (--embeddings): the image will differ")

    # --- the run ---------------------------------------------------------------------------------------------------
    def load(self) -> None:
        self.pipeline = Pipeline.load(self.setup)
        self.summary.load = self.pipeline.load_seconds
        self.note_recorded_differences()

    def warm_up(self) -> None:
        """With --compile or --cuda_graphs, compile/capture for each batch shape first, timed apart."""
        if self.opt.compile or self.opt.cuda_graphs:
            self.summary.warm_up = self.pipeline.warm_up(self.requests)

    def generate(self) -> None:
        opt = self.opt
        grid_images: list[np.ndarray] = []
        records: list[ImageRecord] = []
        entries: list[dict[str, Any]] = []
        requests = iter(zip(self.plan.batches, self.requests))
        for iteration in tqdm(range(opt.n_iter), desc="Sampling", disable=opt.n_iter == 1):
            for _ in tqdm(range(self.plan.batches_per_iteration[iteration]), desc="data", leave=False):
                batch, request = next(requests)
                result = self.pipeline(request)
                self.summary.add_batch(request.batch_size, result.steps, result.sampling_seconds,
                                       result.decoding_seconds)
                pixels, flagged = self.finish_pixels(result.pixels)
                for image, image_pixels, record, was_flagged, is_black in zip(batch, pixels, result.records, flagged,
                                                                              black_images(pixels)):
                    label, entry = f"image {image.index} (seed {image.seed})", record.to_mapping()
                    if not opt.skip_save:
                        path = self.writing(self.save_sample, image_pixels, record)
                        label, entry["file"] = str(path), f"samples/{path.name}"
                    if was_flagged:
                        self.note(f"{label}: flagged by the safety checker, replaced by a black image")
                    elif is_black:
                        self.note(f"{label}: the model produced an entirely black image")
                    if not opt.skip_grid:
                        grid_images.append(image_pixels)
                        records.append(record)
                        entries.append(entry)
        if grid_images:
            self.saved.append(self.writing(self.save_grid, grid_images, records[0], entries))

    def finish_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """Safety checker (flagged images become black) and watermark; returns the pixels and the flags."""
        flagged = self.safety_checker.flags(list(pixels)) if self.safety_checker else [False] * len(pixels)
        pixels = pixels.copy()
        for index, flag in enumerate(flagged):
            if flag:
                pixels[index] = 0
        if self.watermarker is not None:
            for index in range(len(pixels)):
                try:
                    pixels[index] = self.watermarker.apply(pixels[index])
                except Exception as error:  # noqa: BLE001 - e.g. images under 256x256, which DWT-DCT refuses
                    if not self.watermark_failed:
                        self.note(f"the watermark could not be added ({error}); images are saved without it")
                    self.watermark_failed = True
        return pixels, flagged

    # --- files -----------------------------------------------------------------------------------------------------
    def save_sample(self, pixels: np.ndarray, record: ImageRecord) -> Path:
        if self.next_sample is None:
            self.next_sample = next_sample_number(self.sample_dir)
        paths, number = write_new_files(self.sample_dir, f"{{:0{SAMPLE_DIGITS}d}}", self.next_sample,
                                        self.image_files(pixels, record, record.to_mapping()))
        self.next_sample = number + 1
        self.saved.append(paths[0])
        return paths[0]

    def save_grid(self, grid_images: list[np.ndarray], first: ImageRecord, entries: list[dict[str, Any]]) -> Path:
        outdir = Path(self.opt.outdir)
        per_row = self.opt.n_rows if self.opt.n_rows > 0 else self.opt.n_samples
        paths, _ = write_new_files(outdir, f"grid-{{:0{GRID_DIGITS}d}}", next_grid_number(outdir),
                                   self.image_files(make_grid(grid_images, per_row), first, {"images": entries}))
        return paths[0]

    def image_files(self, pixels: np.ndarray, record: ImageRecord, sidecar: dict[str, Any]) -> dict[str, bytes]:
        """{suffix: bytes}: the PNG (with its "parameters" text) and its .yaml sidecar; the PNG alone with
        --no_metadata."""
        if self.opt.no_metadata:
            return {".png": encode_png(pixels, None)}
        return {".png": encode_png(pixels, parameters_text(record)), ".yaml": sidecar_text(sidecar).encode("utf-8")}

    def writing(self, save: Callable[..., Path], *args: Any) -> Path:
        """`save(*args)`, with a full disk or a read-only folder reported in one line (earlier files stay)."""
        try:
            return save(*args)
        except OSError as error:
            raise GenerationError(f"cannot write to {self.opt.outdir}: {error.strerror or error}; free some space "
                                  f"or pick another --outdir") from None


def info(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None, *, prog: str = PROG,
         parse: Callable[[Sequence[str] | None], argparse.Namespace] = parse_args, shell: type[Shell] = Shell) -> int:
    """Run txt2img (or, with another script's `prog`, `parse` and `shell`, that script) with command-line `argv`;
    returns the exit status (0 done, 1 failed, 2 bad input)."""
    run = None
    try:
        run = shell(parse(argv))
        run.load()
        run.warm_up()
        run.generate()
    except SystemExit as exit_request:  # --help
        return exit_request.code if isinstance(exit_request.code, int) else 0
    except (UsageError, LoadError, CheckpointError, PromptFileError, MissingDependency) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except GenerationError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = len(run.saved) if run is not None else 0
        print(f"{prog}: interrupted; {saved} file(s) were saved completely, none partially", file=sys.stderr)
        return 130
    for line in run.summary.lines():
        print(line)
    print(f"Your samples are ready and waiting for you here: \n{run.opt.outdir} \n \nEnjoy.")
    return 0
