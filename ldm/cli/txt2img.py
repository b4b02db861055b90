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
import torch

from ldm.checkpoints import CheckpointError
from ldm.cli.arguments import check_counts, lora_specs, parse_args, sampler_from_flags
from ldm.cli.distributed import join_world, rank_device
from ldm.cli.images import MissingDependency, Watermarker
from ldm.cli.job import Job, Outputs, RankTotals
from ldm.cli.plan import (RunPlan, apply_compat_flags, check_files, fill_model_defaults, peek_config, plan_batches,
                          read_jobs)
from ldm.cli.prompts import PromptFileError, PromptJob
from ldm.cli.safety import SafetyChecker
from ldm.cli.summary import RunSummary
from ldm.diffusers_folder import FolderError, is_diffusers_folder, read_folder
from ldm.loading import LoadError
from ldm.pipeline import AddOn, ControlNet, Embeddings, Loras, Options, Pipeline, Refiner, prompt_lora_tags
from ldm.pipeline.addons.hires import HiresFix
from ldm.pipeline.addons.refiner import DEFAULT_SWITCH
from ldm.pipeline.extra_networks import lora_present, lora_tags
from ldm.pipeline.errors import GenerationError, UsageError
from ldm.pipeline.metadata import check_made_by, named_hashes
from ldm.pipeline.model_info import check_latent_flags, takes_guidance_embedding
from ldm.pipeline.presets import few_step_preset
from ldm.pipeline.request import check_scheduler

PROG = "txt2img.py"


def options_from_flags(opt: argparse.Namespace) -> Options:
    return Options(use_ema=True if opt.ema else None, v_prediction=opt.v_prediction or None, vae=opt.vae,
                   unet=opt.unet, offload=opt.offload, attention_slicing=opt.attention_slicing,
                   vae_tiling=opt.vae_tiling, vae_slicing=opt.vae_slicing, compile=opt.compile,
                   cuda_graphs=opt.cuda_graphs, hash_files=not opt.no_metadata, trust_config=opt.trust_config)


class Shell:
    """One run of a script: its flags, the checked plan and add-ons (all before the model loads), the pipeline, and
    the files it writes. Subclasses add their sampling add-on (`sampling_addon`) and adjust flags first
    (`prepare`)."""

    prog = PROG

    def __init__(self, opt: argparse.Namespace):
        started = time.perf_counter()
        self.world = join_world(opt.device)  # torchrun's processes meet here; nothing is printed before
        apply_compat_flags(opt)
        self.prepare(opt)
        fill_model_defaults(opt, peek_config(opt))
        check_counts(opt)
        self.opt = opt
        jobs = read_jobs(opt)
        self.apply_preset(opt, jobs)
        self.plan: RunPlan = plan_batches(opt, jobs)
        self.recorded = self.plan.source_info  # what a --metadata_from image records
        if opt.metadata_from:
            try:
                check_made_by(self.recorded, opt.metadata_from, self.prog)
            except ValueError as error:
                raise UsageError(str(error)) from None
        check_files(opt)
        specs = lora_specs(opt.lora)
        self.embeddings = Embeddings(opt.embeddings)
        if opt.metadata_from and self.recorded.get("prompt_weighting") and "prompt_weighting" not in opt.given:
            opt.prompt_weighting = True  # the recorded image read its prompts with weights
        self.take_recorded_inputs()
        self.requests = self.plan.requests(opt)
        self.loras = Loras(specs, prompt_lora_tags(self.requests), opt.lora_dir)
        self.addons = self.make_addons()
        self.setup = Pipeline.check(opt.ckpt, opt.config, rank_device(self.world, opt.device), opt.precision,
                                    addons=self.addons, requests=self.requests, options=options_from_flags(opt),
                                    note=self.note, info=self.info)
        check_latent_flags(opt.f, opt.C, self.setup.config)
        self.watermarker = Watermarker() if opt.watermark else None
        self.safety_checker = self.make_safety_checker()
        self.summary = RunSummary(self.setup.device, self.setup.dtype, started=started)
        self.watermark_failed = False
        self.ranks: list[RankTotals] = []

    # --- flags to add-ons ------------------------------------------------------------------------------------------
    def apply_preset(self, opt: argparse.Namespace, jobs: Sequence[PromptJob]) -> None:
        """A few-step model's settings (`few_step_preset`: SDXL-Lightning, Hyper-SD, LCM-LoRA, Turbo, from the
        checkpoint's, --lora files' and prompt tags' names, or a diffusers folder's scheduler) for the flags not
        given, said in one line; not for --metadata_from, whose image records its own."""
        if opt.metadata_from:
            return
        tags = [tag.name for job in jobs for tag in lora_tags(job.prompt)]
        scheduler = None
        if is_diffusers_folder(opt.ckpt):
            try:
                scheduler = read_folder(opt.ckpt).scheduler
            except FolderError:  # reported when the folder loads
                pass
        embedded = takes_guidance_embedding(opt.ckpt, opt.unet)
        # a UNet file (SDXL-Lightning's, Hyper-SD's) is what makes the model few-step, as a LoRA does
        files = ([opt.unet] if opt.unet else []) + [path for path, _ in lora_specs(opt.lora)] + tags
        preset = few_step_preset(opt.ckpt, files, scheduler, guidance_embedded=embedded)
        if preset is None:
            return
        if preset.unsupported:
            raise UsageError(f"{preset.model} ({preset.source}): {preset.unsupported}")
        applied = []
        for flag, dest, value in (("--sampler", "sampler", preset.sampler), ("--scheduler", "scheduler",
                                  preset.scheduler), ("--ddim_steps", "ddim_steps", preset.steps),
                                  ("--scale", "scale", preset.scale)):
            given = opt.given & set(PRESET_FLAG_DESTS[dest])
            if value is None or given or (dest == "scheduler" and not takes_schedule(opt, value)):
                continue
            setattr(opt, dest, value)
            applied.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
        if applied:
            self.note(f"{preset.describe()}: applied its authors' settings {' '.join(applied)} (a flag you give "
                      f"wins){f'; {preset.note}' if preset.note else ''}")

    def prepare(self, opt: argparse.Namespace) -> None:
        """Adjust the flags before the plan is made (img2img: the size from the init image)."""

    def sampling_addon(self) -> AddOn | None:
        """The add-on that decides how latents are made (none: from noise; the refiner's hand-off; the hires fix)."""
        opt = self.opt
        refiner = self.refiner_addon()
        if opt.hr_scale is None and not (opt.hr_resize_x or opt.hr_resize_y):
            return refiner
        if refiner is not None:
            raise UsageError("--refiner and the hires fix (--hr_scale, --hr_resize_x/_y) cannot be combined yet: "
                             "leave one out")
        return HiresFix(2.0 if opt.hr_scale is None else opt.hr_scale, opt.hr_upscaler, opt.hr_second_pass_steps,
                        opt.denoising_strength, opt.hr_resize_x, opt.hr_resize_y)

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
        if self.world.leader:  # under torchrun every process would say the same
            print(f"{self.prog}: note: {message}", file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        if self.world.leader:
            print(message, flush=True)

    def take_recorded_inputs(self) -> None:
        """--metadata_from: say which recorded fields this tool does not apply, emulate CUDA's random numbers where
        the image was made with them and there is no CUDA here, and name every LoRA the prompt needs that is not
        found (with the hash to look for)."""
        opt, recorded = self.opt, self.recorded
        if not opt.metadata_from:
            return
        ignored = recorded.get("ignored_fields")
        if ignored:
            self.note(f"{opt.metadata_from}: not applied, as this tool has no such setting: {ignored}")
        if opt.rng == "gpu" and not torch.cuda.is_available() and "rng" not in opt.given:
            opt.rng = "nv"
            self.note(f"{opt.metadata_from} was made with CUDA's random numbers (RNG: GPU): there is no CUDA here, "
                      f"so they are emulated (--rng nv), which gives the same noise")
        hashes = named_hashes(recorded.get("lora_hashes"))
        missing = [tag.name for job in self.plan.images[:1] for tag in lora_tags(job.prompt)
                   if not lora_present(tag.name, opt.lora_dir)]
        if missing:
            raise UsageError(f"{opt.metadata_from} needs LoRA files not found in {opt.lora_dir}: "
                             + ", ".join(f"{name} (hash {hashes.get(name, 'not recorded')})" for name in missing))

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
            hashes = named_hashes(recorded.get("embeddings"))
            named = ", ".join(f"{name} (hash {hashes.get(name, 'not recorded')})" for name in missing)
            self.note(f"{opt.metadata_from} was made with the embeddings {named}, which this run does not load "
                      f"(--embeddings): the image will differ")

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
        """This process's share of the run (all of it without torchrun), then, on rank 0, the grid and summary."""
        opt = self.opt
        outputs = Outputs(Path(opt.outdir), opt.skip_save, opt.skip_grid, opt.no_metadata,
                          opt.n_rows if opt.n_rows > 0 else opt.n_samples, opt.resume)
        identity = [self.prog, Path(opt.ckpt).name, [type(addon).__name__ for addon in self.addons],
                    self.plan.batches_per_iteration]
        self.job = Job(list(zip(self.plan.batches, self.requests)), outputs, self.world, identity, self.note)
        try:
            totals = self.job.run(self.pipeline, self.finish_pixels)
            self.summary.add_batch(totals.images, totals.steps, totals.sampling_seconds, totals.decoding_seconds)
            self.ranks = self.job.finish()
        except OSError as error:  # a full disk or a read-only folder: one line, the files made so far stay
            raise GenerationError(f"cannot write to {opt.outdir}: {error.strerror or error}; free some space or pick "
                                  f"another --outdir") from None
        failed = [reason for rank in self.ranks for reason in rank.failed]
        if failed:
            raise GenerationError(f"{failed[0]} ({len(failed)} batch(es) failed, recorded in {self.job.manifest.path}; "
                                  f"--resume makes them again)")

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

    @property
    def saved(self) -> list[Path]:
        """The files this process has written completely so far."""
        job = getattr(self, "job", None)
        return job.saved if job is not None else []


# A preset's settings and the flags that, given, keep it from applying.
PRESET_FLAG_DESTS = {"sampler": ("sampler", "plms", "dpm_solver"), "scheduler": ("scheduler",),
                     "ddim_steps": ("ddim_steps",), "scale": ("scale",)}


def takes_schedule(opt: argparse.Namespace, schedule: str) -> bool:
    """Whether the run's sampler takes a schedule type (the k-diffusion ones; not ddim, plms, dpm_solver)."""
    try:
        check_scheduler(sampler_from_flags(opt), schedule, "preset")
    except UsageError:
        return False
    return True


def main(argv: Sequence[str] | None = None, *, prog: str = PROG,
         parse: Callable[[Sequence[str] | None], argparse.Namespace] = parse_args, shell: type[Shell] = Shell) -> int:
    """Run txt2img (or, with another script's `prog`, `parse` and `shell`, that script) with command-line `argv`;
    returns the exit status (0 done, 1 failed, 2 bad input)."""
    run = None
    leader = True
    try:
        run = shell(parse(argv))
        leader = run.world.leader
        run.load()
        run.warm_up()
        run.generate()
    except SystemExit as exit_request:  # --help
        return exit_request.code if isinstance(exit_request.code, int) else 0
    except (UsageError, LoadError, CheckpointError, PromptFileError, MissingDependency) as error:
        if leader:  # every process checked the same and found the same: one message
            print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except GenerationError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = len(run.saved) if run is not None else 0
        print(f"{prog}: interrupted; {saved} file(s) were saved completely, none partially", file=sys.stderr)
        return 130
    finally:
        if run is not None:
            run.world.close()
    if leader:
        for line in run.summary.lines() + run_lines(run.ranks):
            print(line)
        print(f"Your samples are ready and waiting for you here: \n{run.opt.outdir} \n \nEnjoy.")
    return 0


def run_lines(ranks: Sequence[RankTotals]) -> list[str]:
    """Under torchrun: the whole run's images and rate, each rank's, and the slowest."""
    if len(ranks) <= 1:
        return []
    images, slowest = sum(rank.images for rank in ranks), max(ranks, key=lambda rank: rank.seconds)
    per_rank = ", ".join(f"rank {rank.rank} {rank.images} in {rank.seconds:.2f} s "
                         f"({rank.images / rank.seconds if rank.seconds else 0:.2f}/s)" for rank in ranks)
    rate = images / slowest.seconds if slowest.seconds else 0.0
    return [f"processes: {len(ranks)}; images: {images} in {slowest.seconds:.2f} s, {rate:.2f} images/s in all",
            f"per process: {per_rank}; slowest: rank {slowest.rank}"]
