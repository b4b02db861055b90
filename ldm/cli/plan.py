"""Everything a run will do, worked out and checked before the model loads: prompts, settings, seeds, batches."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.cli.arguments import DEFAULT_CKPT, sampler_from_flags
from ldm.cli.outputs import can_create_file_in
from ldm.cli.prompts import PromptFileError, PromptJob, job_from_mapping, read_prompt_file
from ldm.diffusers_folder import is_diffusers_folder
from ldm.loading import LoadError, load_config, resolve_config
from ldm.pipeline.errors import UsageError
from ldm.pipeline.metadata import VERSION, read_metadata_file
from ldm.pipeline.model_info import model_defaults
from ldm.pipeline.request import (Request, a1111_sampler_and_schedule, check_image_settings, check_seed,
                                  resolve_sampler, sampler_eta)

# The settings that must agree for images to share a batch (one sampler call).
BATCH_KEYS = ("steps", "sampler", "scale", "eta", "H", "W")
CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
MAX_IMAGES = 100_000  # per run: the plan holds every image, and days of sampling belong in several runs


@dataclass
class PlannedImage:
    prompt: str
    negative_prompt: str
    seed: int
    settings: dict[str, Any]
    index: int  # place in the run, counting across iterations and prompts
    subseed: int = 0  # the variation seed (with --subseed_strength)


@dataclass
class RunPlan:
    batches: list[list[PlannedImage]]
    batches_per_iteration: list[int]
    source_info: dict[str, Any] = field(default_factory=dict)  # model identity recorded in a sidecar being re-run

    @property
    def images(self) -> list[PlannedImage]:
        return [image for batch in self.batches for image in batch]

    def requests(self, opt: argparse.Namespace) -> list[Request]:
        """One pipeline request per batch, with the flags' noise options."""
        return [batch_request(batch, opt) for batch in self.batches]


def batch_request(batch: list[PlannedImage], opt: argparse.Namespace) -> Request:
    settings = batch[0].settings
    resize = opt.seed_resize_from_w, opt.seed_resize_from_h
    return Request([image.prompt for image in batch], [image.negative_prompt for image in batch],
                   seeds=[image.seed for image in batch], steps=settings["steps"], sampler=settings["sampler"],
                   scale=settings["scale"], eta=settings["eta"], height=settings["H"], width=settings["W"],
                   prompt_weighting=opt.prompt_weighting, clip_skip=opt.clip_skip,
                   clip_skip_sdxl=opt.clip_skip_sdxl, scheduler=opt.scheduler,
                   rng=opt.rng, ensd=opt.ensd,
                   subseeds=[image.subseed for image in batch] if opt.subseed_strength > 0 else None,
                   subseed_strength=opt.subseed_strength, seed_resize_from=resize if min(resize) > 0 else None,
                   where="flags")


def apply_compat_flags(opt: argparse.Namespace) -> None:
    """CompVis --laion400m paths and Stability's --bf16, folded into the ordinary options."""
    if opt.laion400m:
        opt.config = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
        opt.ckpt = "models/ldm/text2img-large/model.ckpt"
        opt.outdir = "outputs/txt2img-samples-laion400m"
    if opt.bf16:
        opt.precision = "bf16"


def read_jobs(opt: argparse.Namespace) -> list[PromptJob]:
    """The prompts of the run: --metadata_from (one image), --from-file, or --prompt."""
    if opt.metadata_from and opt.from_file:
        raise UsageError("--metadata_from and --from-file exclude each other: a sidecar also works with --from-file")
    try:
        if opt.metadata_from:
            try:
                record = read_metadata_file(opt.metadata_from)
            except ValueError as error:
                raise UsageError(str(error)) from None
            opt.n_iter, opt.n_samples, opt.repeat = 1, 1, 1  # exactly the image the sidecar describes
            apply_recorded_options(opt, record)
            job = job_from_mapping({key: value for key, value in record.items() if key not in RUN_OPTIONS},
                                   opt.metadata_from, allow_empty=True)
            given = getattr(opt, "given", set())  # a flag on the command line wins over the recorded setting
            job.overrides = {key: value for key, value in job.overrides.items()
                             if not given & set(OVERRIDE_FLAGS.get(key, ()))}
            return [job]
        if opt.from_file:
            return read_prompt_file(opt.from_file)
    except PromptFileError as error:
        raise UsageError(str(error)) from None
    if opt.prompt is None:
        raise UsageError("--prompt needs a text (or use --from-file)")
    return [PromptJob(prompt=opt.prompt)]


# The flags a recorded per-image setting stands for (a flag given wins over the record).
OVERRIDE_FLAGS = {"steps": ("ddim_steps",), "scale": ("scale",), "seed": ("seed",), "H": ("H",), "W": ("W",),
                  "sampler": ("sampler", "plms", "dpm_solver"), "eta": ("ddim_eta",),
                  "negative_prompt": ("negative_prompt",)}
# Recorded run-wide options and the flags they set (AUTOMATIC1111's fields read from an infotext, or a sidecar).
RUN_OPTIONS = {"clip_skip": "clip_skip", "clip_skip_sdxl": "clip_skip_sdxl", "ensd": "ensd", "rng": "rng",
               "subseed": "subseed", "subseed_strength": "subseed_strength", "seed_resize_from_w": "seed_resize_from_w",
               "seed_resize_from_h": "seed_resize_from_h", "hr_scale": "hr_scale",
               "hr_second_pass_steps": "hr_second_pass_steps", "hr_upscaler": "hr_upscaler",
               "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y", "scheduler": "scheduler",
               "img2img_steps": "img2img_steps"}
HIRES_KEYS = ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps")


def apply_recorded_options(opt: argparse.Namespace, record: dict[str, Any]) -> None:
    """The run-wide options a --metadata_from image records, set on `opt` where its flag was not given: clip skip,
    ENSD, random source, variation seed, seed resize, hires fix (its denoising strength), schedule type; and
    AUTOMATIC1111's defaults for what its infotexts leave out (the GPU random source, emphasis on)."""
    given = getattr(opt, "given", set())
    from_a1111 = str(record.get("version") or VERSION) != VERSION and not record.get("file")
    if from_a1111:
        record.setdefault("rng", "gpu")  # AUTOMATIC1111's default source, which it does not write
        if "sampler" in record:  # AUTOMATIC1111's sigmas: "DPM++ 2M Karras" is DPM++ 2M with Karras
            record["sampler"], record["scheduler"] = a1111_sampler_and_schedule(str(record["sampler"]),
                                                                                record.get("scheduler"))
        if str(record.get("emphasis", "Original")).lower() != "none":
            record.setdefault("prompt_weighting", True)
        record.setdefault("img2img_steps", "a1111")  # how its img2img counts steps (scripts with --img2img_steps)
    if any(key in record for key in HIRES_KEYS) and "strength" in record:
        record["denoising_strength"] = record.pop("strength")  # txt2img's: the hires pass's
    for key, flag in {**RUN_OPTIONS, "denoising_strength": "denoising_strength"}.items():
        if key in record and flag not in given and hasattr(opt, flag):
            setattr(opt, flag, record[key])


def job_settings(opt: argparse.Namespace, job: PromptJob, sampler: str) -> dict[str, Any]:
    """The flags' settings with the job's overrides, checked."""
    settings = {"steps": opt.ddim_steps, "sampler": sampler, "scale": opt.scale, "eta": opt.ddim_eta,
                "H": opt.H, "W": opt.W, "negative_prompt": opt.negative_prompt}
    settings.update(job.overrides)
    if "sampler" in job.overrides:
        settings["sampler"] = resolve_sampler(job.overrides["sampler"], where=job.source)
    where = job.source if job.overrides else "flags"
    settings["scale"] = float(settings["scale"])
    settings["eta"] = sampler_eta(settings["sampler"], None if settings["eta"] is None else float(settings["eta"]),
                                  "eta" in job.overrides, where)
    check_image_settings(settings, where, opt.f)
    return settings


def plan_batches(opt: argparse.Namespace, jobs: list[PromptJob]) -> RunPlan:
    """Images in the order they are made, grouped into batches of up to --n_samples with equal settings.

    As in CompVis, each iteration renders the prompt list once (a single --prompt n_samples times); batches never span
    iterations. Seeds: image i gets --seed + i; with --fixed_code, the seed + its place in its batch; a job with its
    own seed numbers its images from that seed.
    """
    sampler = sampler_from_flags(opt)
    if opt.subseed_strength > 0 and opt.subseed is None:
        raise UsageError("--subseed_strength needs --subseed (the variation seed to blend towards)")
    settings = {id(job): job_settings(opt, job, sampler) for job in jobs}
    one_prompt = not (len(jobs) > 1 or opt.from_file or opt.metadata_from)
    count = opt.n_iter * opt.repeat * (opt.n_samples if one_prompt else len(jobs))
    if count > MAX_IMAGES:
        raise UsageError(f"this run would make {count} images (--n_iter {opt.n_iter} x --repeat {opt.repeat} x "
                         f"{f'--n_samples {opt.n_samples}' if one_prompt else f'{len(jobs)} prompts'}), more than "
                         f"{MAX_IMAGES}: make them in several runs, moving --seed on")
    per_iteration = (jobs * (opt.n_samples * opt.repeat) if one_prompt
                     else [job for job in jobs for _ in range(opt.repeat)])
    batches: list[list[PlannedImage]] = []
    per_iteration_counts: list[int] = []
    made_by_job: dict[int, int] = {}
    index = 0
    for _ in range(opt.n_iter):
        groups: list[list[PromptJob]] = []
        for job in per_iteration:
            key = tuple(settings[id(job)][name] for name in BATCH_KEYS)
            same = groups and tuple(settings[id(groups[-1][0])][name] for name in BATCH_KEYS) == key
            if same and len(groups[-1]) < opt.n_samples:
                groups[-1].append(job)
            else:
                groups.append([job])
        for group in groups:
            batch = []
            for place, job in enumerate(group):
                has_own_seed = "seed" in job.overrides
                base, where = (job.overrides["seed"], job.source) if has_own_seed else (opt.seed, "--seed")
                if opt.fixed_code:
                    offset = place
                else:
                    offset = made_by_job.get(id(job), 0) if has_own_seed else index
                check_seed(base, where, offset)
                if opt.subseed_strength > 0:  # AUTOMATIC1111: every image keeps its seed; the subseeds count up
                    check_seed(opt.subseed, "--subseed", offset)
                    batch.append(PlannedImage(job.prompt, settings[id(job)]["negative_prompt"], base,
                                              settings[id(job)], index, opt.subseed + offset))
                else:
                    batch.append(PlannedImage(job.prompt, settings[id(job)]["negative_prompt"], base + offset,
                                              settings[id(job)], index))
                made_by_job[id(job)] = made_by_job.get(id(job), 0) + 1
                index += 1
            batches.append(batch)
        per_iteration_counts.append(len(groups))
    return RunPlan(batches, per_iteration_counts, source_info=dict(jobs[0].info) if opt.metadata_from else {})


def missing_checkpoint_message(ckpt: str) -> str:
    """Where the checkpoint goes and which files fit, naming candidates found next to the expected place."""
    folder = Path(ckpt).parent
    found = sorted(name for name in os.listdir(folder) if name.lower().endswith(CHECKPOINT_SUFFIXES)) \
        if folder.is_dir() else []
    nearby = f"; found in {folder}: {', '.join(found[:5])} (pass one with --ckpt)" if found else ""
    return (f"checkpoint {ckpt} not found: put a Stable Diffusion 1.x/2.x/XL checkpoint there (e.g. sd-v1-4.ckpt, "
            f"v1-5-pruned-emaonly.safetensors, v2-1_768-ema-pruned.safetensors, sd_xl_base_1.0.safetensors, renamed to {Path(DEFAULT_CKPT).name} "
            f"in {Path(DEFAULT_CKPT).parent}) or pass --ckpt PATH{nearby}")


def check_files(opt: argparse.Namespace) -> None:
    if not os.path.isfile(opt.ckpt) and not is_diffusers_folder(opt.ckpt):
        if os.path.isdir(opt.ckpt):
            raise UsageError(f"--ckpt {opt.ckpt} is a folder without model_index.json: pass a checkpoint file or a "
                             f"diffusers model folder (model_index.json, unet/, vae/, text_encoder/, scheduler/)")
        raise UsageError(missing_checkpoint_message(opt.ckpt))
    for flag, path, what in (("--vae", opt.vae, "an autoencoder"), ("--unet", getattr(opt, "unet", None), "a UNet")):
        if path is not None and not os.path.exists(path):
            raise UsageError(f"{flag} {path} not found: pass the path of {what} .ckpt/.safetensors file or "
                             f"diffusers folder")
    if opt.safety_checker is not None and not os.path.isdir(opt.safety_checker):
        raise UsageError(f"--safety_checker {opt.safety_checker} is not a folder: pass a local copy of a safety "
                         f"checker (config.json, preprocessor_config.json and weights); nothing is downloaded")
    check_outdir(opt.outdir)


def check_outdir(outdir: str) -> None:
    """The images must be writable under `outdir` (OUTDIR/samples and OUTDIR), checked before anything runs."""
    if not outdir.strip():
        raise UsageError("--outdir is empty: pass the folder the images go to")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UsageError(f"--outdir {outdir} is a file, not a folder: pick another --outdir")
    if os.path.isfile(os.path.join(outdir, "samples")):
        raise UsageError(f"{os.path.join(outdir, 'samples')} is a file, not a folder: pick another --outdir")
    existing = Path(outdir).absolute()
    while not existing.exists():  # the folder that the missing ones will be made in
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--outdir {outdir} cannot be made: {existing} is a file, not a folder; pick another --outdir")
    if not can_create_file_in(existing):  # a probe, not os.access: root passes access checks on /proc or read-only mounts
        raise UsageError(f"--outdir {outdir}: files cannot be created in {existing}; pick another --outdir")


def fill_model_defaults(opt: argparse.Namespace, config: Any | None) -> None:
    """--f, --C, --H and --W that were not given: the model's own (see `model_defaults`)."""
    for flag, value in model_defaults(config, getattr(opt, "ckpt", None)).items():
        if getattr(opt, flag) is None:
            setattr(opt, flag, value)


def peek_config(opt: argparse.Namespace) -> Any | None:
    """The model's config when the checkpoint can be read already; problems are reported in their turn later."""
    if not os.path.isfile(opt.ckpt) and not is_diffusers_folder(opt.ckpt):
        return None
    try:
        return load_config(resolve_config(opt.ckpt, opt.config, opt.v_prediction or None), opt.trust_config)
    except LoadError:
        return None
