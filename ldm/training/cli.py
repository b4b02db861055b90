"""`python main.py --base CONFIG -t`: train the model a config describes, CompVis style, on PyTorch Lightning.

A run lives in one folder, `<logdir>/<name>` (default name: `<date>T<time>_<config name>`), holding
`configs/project.yaml` (the merged config), `checkpoints/last.ckpt` (resumable; released key layout),
`checkpoints/last.safetensors` (what the run ships), `images/` (samples) and `csv/` (the logged losses).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.checkpoints import CheckpointError
from ldm.loading import LoadError
from ldm.training.autoencoder import AutoencoderTraining
from ldm.training.callbacks import CheckpointAndExport, SampleImages
from ldm.training.diffusion import LatentDiffusionTraining
from ldm.training.lightning import pl
from ldm.training.settings import TrainingSettings
from ldm.util import instantiate_from_config, to_plain

PROG = "main.py"
PROJECT_CONFIG = "project.yaml"
EPILOG = """\
Any further KEY=VALUE argument overrides the merged config, e.g. lightning.trainer.max_steps=200
data.params.batch_size=16 training.lora.rank=8.

examples:
  python main.py --base configs/autoencoder/shapes-kl-f4.yaml -t --name shapes-autoencoder
  python main.py --base configs/latent-diffusion/shapes.yaml -t --name shapes
  python main.py --resume logs/shapes -t --max_steps 8000       # continue a run, to step 8000
  python main.py --base configs/stable-diffusion/v1-inference.yaml configs/finetune/lora-folder.yaml -t \\
      training.init_from=models/ldm/stable-diffusion-v1/model.ckpt data.params.train.params.root=my-photos"""


class UsageError(Exception):
    """Bad command-line input: one line for the user, exit status 2, before anything heavy starts."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train a latent diffusion model or its autoencoder.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("-b", "--base", nargs="*", metavar="CONFIG", default=[],
        help="config yaml files, merged left to right (later ones override earlier ones)")
    add("-t", "--train", action="store_true", help="train (the only mode this script has)")
    add("-r", "--resume", type=str, default=None, metavar="PATH",
        help="continue a run: its folder or a .ckpt in it; its saved config is used (any --base merges on top)")
    add("-n", "--name", type=str, default=None, help="the run's folder name under --logdir")
    add("-l", "--logdir", type=str, default="logs", help="where run folders are made")
    add("-s", "--seed", type=int, default=23, help="seed for initial weights, noise, timesteps and caption dropout")
    add("--max_steps", type=int, default=None, help="train up to this many optimizer steps in all")
    add("--scale_lr", action="store_true",
        help="learning rate = base_learning_rate * batch size * accumulate_grad_batches (as CompVis does by default)")
    add("--accelerator", type=str, default=None, help="Lightning accelerator: cpu, gpu, mps or auto (default auto)")
    add("--threads", type=int, default=None, help="CPU threads for torch (on a busy machine 1 is often fastest)")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    opt, overrides = parser.parse_known_args(argv)
    bad = [item for item in overrides if item.startswith("-") or "=" not in item]
    if bad:
        raise UsageError(f"unrecognised arguments {bad}: config overrides are written KEY=VALUE")
    if not opt.train:
        raise UsageError("nothing to do: pass -t to train (sampling is scripts/txt2img.py)")
    if not opt.base and not opt.resume:
        raise UsageError("pass --base CONFIG (a training config such as configs/latent-diffusion/shapes.yaml) "
                         "or --resume RUN_FOLDER")
    if opt.max_steps is not None and opt.max_steps < 1:
        raise UsageError(f"--max_steps {opt.max_steps} must be at least 1")
    return opt, overrides


def resolve_resume(resume: str) -> tuple[Path, Path]:
    """(run folder, checkpoint) of --resume, which names either."""
    path = Path(resume)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
    elif path.is_file():
        ckpt = path
    else:
        raise UsageError(f"--resume {resume} does not exist: pass a run folder (logs/NAME) or its .ckpt")
    if not ckpt.is_file():
        raise UsageError(f"--resume {resume}: {ckpt} does not exist (the run saved no checkpoint yet)")
    logdir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return logdir, ckpt


def load_config(opt: argparse.Namespace, overrides: list[str], run_dir: Path | None) -> Any:
    paths = [Path(base) for base in opt.base]
    if run_dir is not None and (run_dir / "configs" / PROJECT_CONFIG).is_file():
        paths.insert(0, run_dir / "configs" / PROJECT_CONFIG)
    configs = []
    for path in paths:
        if not path.is_file():
            raise UsageError(f"config {path} does not exist")
        try:
            configs.append(OmegaConf.load(str(path)))
        except Exception as error:  # yaml raises many types; all mean the same to the user
            raise UsageError(f"cannot read config {path}: {str(error).splitlines()[0]}") from None
    try:
        config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(overrides))
    except Exception as error:
        raise UsageError(f"cannot apply the overrides {overrides}: {str(error).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise UsageError(f"the config leaves {', '.join(missing)} to be filled in: pass KEY=VALUE for each")
    if opt.max_steps is not None:
        OmegaConf.update(config, "lightning.trainer.max_steps", opt.max_steps, force_add=True)
    if opt.accelerator is not None:
        OmegaConf.update(config, "lightning.trainer.accelerator", opt.accelerator, force_add=True)
    for key in ("model.target", "model.base_learning_rate", "data.params.batch_size", "data.params.train.target",
                "lightning.trainer.max_steps"):
        if OmegaConf.select(config, key) is None:
            raise UsageError(f"the config has no {key}: see configs/latent-diffusion/shapes.yaml for a complete one"
                             + (" (or pass --max_steps)" if key.endswith("max_steps") else ""))
    return config


def new_run_dir(opt: argparse.Namespace) -> Path:
    name = opt.name or f"{datetime.now().strftime('%Y-%m-%dT%H-%M-%S')}_{Path(opt.base[-1]).stem}"
    run_dir = Path(opt.logdir) / name
    if (run_dir / "checkpoints").exists():
        raise UsageError(f"run folder {run_dir} already holds checkpoints: continue it with --resume {run_dir}, "
                         "or pick another --name")
    return run_dir


def build_module(config: Any, learning_rate: float, seed: int) -> Any:
    settings = TrainingSettings.from_config(to_plain(config.get("training")))
    target = config.model.target
    if target.endswith("AutoencoderKL"):
        return AutoencoderTraining(config.model, settings, learning_rate, seed)
    if target.endswith("LatentDiffusion"):
        return LatentDiffusionTraining(config.model, settings, learning_rate, seed)
    raise UsageError(f"model.target {target} cannot be trained: use ldm.models.diffusion.ddpm.LatentDiffusion or "
                     "ldm.models.autoencoder.AutoencoderKL")


def build_dataloader(config: Any, seed: int, needs_captions: bool) -> Any:
    params = config.data.params
    dataset = instantiate_from_config(params.train)
    batch_size = int(params.batch_size)
    if len(dataset) < batch_size:
        raise UsageError(f"the data set has {len(dataset)} items, fewer than batch_size {batch_size}: lower "
                         "data.params.batch_size or raise the data set's repeats")
    first = dataset[0]
    for key in ("image", "index") + (("caption",) if needs_captions else ()):
        if key not in first:
            raise UsageError(f"data set {params.train.target} items lack {key!r}: items must be dicts with "
                             "'image', 'caption' and 'index' (see ldm/data)")
    workers = int(params.get("num_workers", 0))
    return DataLoader(dataset, batch_size=batch_size, shuffle=bool(params.get("shuffle", True)), drop_last=True,
                      num_workers=workers, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def build_trainer(config: Any, run_dir: Path, module: Any, seed: int) -> Any:
    # the frozen autoencoder (and text encoder) are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

    settings = module.settings
    callbacks = [CheckpointAndExport(run_dir / "checkpoints", settings.checkpoint_every_n_steps)]
    if settings.sample_every_n_steps or settings.sample_prompts:
        callbacks.append(SampleImages(run_dir / "images", settings.sample_every_n_steps, settings.sample_prompts,
                                      settings.sample_steps, settings.sample_scale, settings.sample_sampler, seed))
    sessions = len(list((run_dir / "csv").glob("session-*"))) if (run_dir / "csv").is_dir() else 0
    logger = pl.loggers.CSVLogger(save_dir=str(run_dir), name="csv", version=f"session-{sessions}")
    trainer_config = {"accelerator": "auto", "log_every_n_steps": 10, **to_plain(config.lightning.trainer)}
    return pl.Trainer(default_root_dir=str(run_dir), logger=logger, callbacks=callbacks, enable_checkpointing=False,
                      num_sanity_val_steps=0, limit_val_batches=0, **trainer_config)


def latent_std(module: Any, loader: Any, batches: int = 8) -> float:
    """Standard deviation of the autoencoder's latent samples over a few batches (scale_factor is its inverse)."""
    values = []
    with torch.no_grad():
        for index, batch in enumerate(loader):
            if index == batches:
                break
            posterior = module.autoencoder.encode(batch["image"].to(module.device))
            values.append(posterior.sample(generator=module.generator).flatten().float().cpu())
    return float(torch.cat(values).std())


def main(argv: Sequence[str] | None = None) -> int:
    """Train as the arguments say; returns the exit status (0 done, 2 bad input)."""
    try:
        opt, overrides = parse_args(argv)
        run_dir, resume_ckpt = resolve_resume(opt.resume) if opt.resume else (None, None)
        config = load_config(opt, overrides, run_dir)
        run_dir = run_dir if run_dir is not None else new_run_dir(opt)
        if opt.threads is not None:
            torch.set_num_threads(max(1, opt.threads))
        torch.manual_seed(opt.seed)  # initial weights: modules draw them from the global generator when built
        learning_rate = float(config.model.base_learning_rate)
        if opt.scale_lr:
            accumulate = int(config.lightning.trainer.get("accumulate_grad_batches", 1))
            learning_rate *= accumulate * int(config.data.params.batch_size)
        module = build_module(config, learning_rate, opt.seed)
        loader = build_dataloader(config, opt.seed, needs_captions=hasattr(module, "ldm"))
    except (UsageError, ValueError, FileNotFoundError, CheckpointError, LoadError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    (run_dir / "configs").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, run_dir / "configs" / PROJECT_CONFIG)
    print(f"{PROG}: run folder {run_dir}; learning rate {learning_rate:.3g}; "
          f"{sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6:.2f}M trained parameters"
          + (f"; resuming from {resume_ckpt}" if resume_ckpt else ""), flush=True)
    trainer = build_trainer(config, run_dir, module, opt.seed)
    start = time.perf_counter()
    # weights_only: resuming reads tensors and plain containers only, never pickled code
    trainer.fit(module, loader, ckpt_path=str(resume_ckpt) if resume_ckpt else None,
                weights_only=True if resume_ckpt else None)
    seconds = time.perf_counter() - start
    loss = trainer.callback_metrics.get("train/loss")
    print(f"{PROG}: {trainer.global_step} steps in all, {seconds:.0f} s this session"
          + (f", last loss {float(loss):.4f}" if loss is not None else ""))
    print(f"{PROG}: checkpoints in {run_dir / 'checkpoints'} (last.ckpt to resume, last.safetensors to use)")
    if not hasattr(module, "ldm"):
        std = latent_std(module, loader)
        print(f"{PROG}: latent standard deviation {std:.4f}: use scale_factor: {1 / std:.5f} in the diffusion config")
    return 0
