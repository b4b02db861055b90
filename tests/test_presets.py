"""Few-step presets (ldm/pipeline/presets.py): which files are recognised, the settings given, and the scripts
applying them only where no flag was given."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from image_files import parameters
from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.k_denoisers import CompVisDenoiser
from ldm.models.diffusion.noise import ImageNoise
from ldm.pipeline import Request
from ldm.pipeline.presets import Preset, few_step_preset
from toy_diffusion import NonlinearToyDiffusion


@pytest.mark.parametrize(("ckpt", "loras", "expected"), [
    ("sd_xl_base_1.0.safetensors", ["sdxl_lightning_4step_lora.safetensors"], ("euler", "Trailing", 4, 1.0)),
    ("sdxl_lightning_8step.safetensors", [], ("euler", "Trailing", 8, 1.0)),
    ("sdxl_lightning_2step_unet.safetensors", [], ("euler", "Trailing", 2, 1.0)),
    ("v1-5.ckpt", ["Hyper-SD15-8steps-lora.safetensors"], ("ddim", "Trailing", 8, 1.0)),
    ("x.ckpt", ["Hyper-SDXL-12steps-CFG-lora.safetensors"], ("ddim", "Trailing", 12, 5.0)),
    ("x.ckpt", ["Hyper-SDXL-1step-lora.safetensors"], ("lcm", "LCM", 1, 1.0)),
    ("Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors", [], ("lcm", "LCM", 1, 1.0)),
    ("x.ckpt", ["lcm-lora-sdv1-5"], ("lcm", "LCM", 4, 1.0)),  # a <lora:lcm-lora-sdv1-5:1> tag's name
    ("x.ckpt", ["hub/models--latent-consistency--lcm-lora-sdxl/snapshots/0ab1/pytorch_lora_weights.safetensors"],
     ("lcm", "LCM", 4, 1.0)),
    ("LCM_Dreamshaper_v7.safetensors", [], ("lcm", "LCM", 4, 1.0)),
    ("sd_xl_turbo_1.0_fp16.safetensors", [], ("euler_a", "Trailing", 1, 1.0)),
    ("sd_turbo.safetensors", [], ("euler_a", "Trailing", 1, 1.0)),
])
def test_few_step_files_are_recognised(ckpt, loras, expected):
    preset = few_step_preset(ckpt, loras)
    assert (preset.sampler, preset.scheduler, preset.steps, preset.scale) == expected
    assert not preset.unsupported
    request = Request("a fox", **preset.request_fields())  # every preset makes a valid request
    assert (request.sampler, request.steps, request.scale) == (expected[0], expected[2], expected[3])


@pytest.mark.parametrize(("ckpt", "loras"), [("v1-5-pruned-emaonly.safetensors", ["add_detail.safetensors"]),
                                             ("dreamshaper_8.safetensors", []), ("sd_xl_base_1.0.safetensors", []),
                                             (None, [])])
def test_ordinary_files_have_no_preset(ckpt, loras):
    assert few_step_preset(ckpt, loras) is None


def test_the_lora_wins_over_the_checkpoint_and_x0_models_are_refused():
    assert few_step_preset("sd_xl_turbo_1.0.safetensors", ["sdxl_lightning_2step_lora.safetensors"]).steps == 2
    preset = few_step_preset("sdxl_lightning_1step_x0.safetensors")
    assert "clean latents" in preset.unsupported and preset.request_fields() == {}


def test_metadata_titles_and_scheduler_configs_tell(tmp_path):
    path = tmp_path / "renamed.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"modelspec.title": "SDXL Turbo"})
    assert few_step_preset(path).model == "SDXL Turbo"
    save_file({"w": torch.zeros(1)}, path, metadata={"format": "pt"})
    assert few_step_preset(path) is None
    turbo = {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}
    assert few_step_preset("folder", (), turbo).request_fields() == {"sampler": "euler_a", "scheduler": "Trailing"}
    assert few_step_preset("folder", (), {"_class_name": "LCMScheduler"}).request_fields() == {
        "sampler": "lcm", "scheduler": "LCM", "steps": 4, "scale": 1.0}
    assert few_step_preset("folder", (), {"_class_name": "PNDMScheduler", "timestep_spacing": "leading"}) is None
    assert few_step_preset("folder", (), {"_class_name": "EulerDiscreteScheduler", "prediction_type": "sample",
                                          "timestep_spacing": "trailing"}).unsupported


def test_describe():
    preset = Preset("SDXL-Lightning 1-step", "f.safetensors", "euler", "Trailing", 1, 1.0)
    assert preset.describe() == "SDXL-Lightning 1-step (f.safetensors): euler, Trailing, 1 step, scale 1"


def test_scale_one_runs_the_conditional_prediction_alone():
    """What the presets' scale 1 means: diffusers' guidance_scale <= 1 (no unconditional pass), to the bit."""
    toy, sigmas = NonlinearToyDiffusion(), torch.tensor([14.6, 3.0, 0.5, 0.0])
    cond, uncond = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    x = ImageNoise([1]).randn((1, 4, 8, 8)) * sigmas[0]
    runs = []
    for extra in ({"cond": cond, "uncond": uncond, "cond_scale": 1.0}, {"cond": cond}):
        toy.calls = 0
        runs.append(k_sampling.sample_euler(CompVisDenoiser(toy), x, sigmas, extra_args=extra, disable=True))
        assert toy.calls == 3  # one model call a step, on a batch of one
    assert torch.equal(*runs)


# --- the scripts ------------------------------------------------------------------------------------------------------
@pytest.fixture
def run_named(tiny_checkpoint, tiny_config, tmp_path, capsys, one_thread):
    """run_named(name, *flags) -> (status, stderr, infotext): txt2img on the tiny SD 1.x model saved as `name`."""
    from ldm.cli.txt2img import main

    def run(name, *flags):
        ckpt = tmp_path / name
        if not ckpt.exists():
            ckpt.symlink_to(tiny_checkpoint)
        outdir = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        status = main(["--ckpt", str(ckpt), "--config", str(tiny_config), "--H", "32", "--W", "32", "--n_samples",
                       "1", "--n_iter", "1", "--skip_grid", "--seed", "5", "--outdir", str(outdir),
                       *[str(flag) for flag in flags]])
        made = outdir / "samples" / "00000.png"
        return status, capsys.readouterr().err, parameters(made) if made.exists() else ""
    return run


def test_the_scripts_apply_a_preset_where_no_flag_was_given(run_named):
    status, err, infotext = run_named("sdxl_lightning_2step.ckpt")
    assert status == 0, err
    assert "SDXL-Lightning 2-step (sdxl_lightning_2step.ckpt)" in err
    assert "applied its authors' settings --sampler euler --scheduler Trailing --ddim_steps 2 --scale 1" in err
    assert "Steps: 2, Sampler: Euler, CFG scale: 1," in infotext and "Schedule type: Trailing" in infotext

    status, err, infotext = run_named("sdxl_lightning_2step.ckpt", "--scale", 2, "--ddim_steps", 3)
    assert status == 0, err
    assert "applied its authors' settings --sampler euler --scheduler Trailing (a flag you give wins)" in err
    assert "Steps: 3, Sampler: Euler, CFG scale: 2," in infotext and "Schedule type: Trailing" in infotext

    status, err, infotext = run_named("sdxl_lightning_2step.ckpt", "--sampler", "ddim")  # DDIM on trailing steps
    assert status == 0, err
    assert "applied its authors' settings --scheduler Trailing --ddim_steps 2 --scale 1" in err
    assert "Sampler: DDIM," in infotext and "Schedule type: Trailing" in infotext

    status, err, infotext = run_named("sdxl_lightning_2step.ckpt", "--sampler", "dpm_solver")  # takes no schedule
    assert status == 0, err
    assert "applied its authors' settings --ddim_steps 2 --scale 1" in err and "Schedule type" not in infotext


def test_the_scripts_refuse_an_x0_model_before_loading(run_named):
    status, err, _ = run_named("sdxl_lightning_1step_x0.ckpt")
    assert status == 2 and "predicts the clean latents" in err and "use the 2-step model" in err


def test_an_ordinary_model_gets_no_preset(run_named):
    status, err, infotext = run_named("tiny.ckpt", "--ddim_steps", 2)
    assert status == 0, err
    assert "authors' settings" not in err and "Sampler: DDIM" in infotext


def test_a_diffusers_folder_tells_by_its_scheduler(tiny_checkpoint, tmp_path, run_named):
    from diffusers import EulerAncestralDiscreteScheduler

    from reference_sd import SCHEDULE, diffusers_pipeline

    scheduler = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **{
        key: value for key, value in SCHEDULE.items() if key != "set_alpha_to_one"})
    diffusers_pipeline(tiny_checkpoint, tmp_path, scheduler).save_pretrained(tmp_path / "a-folder")
    status, err, infotext = run_named("a-folder", "--ddim_steps", 2)
    assert status == 0, err
    assert ("a model sampled on trailing timesteps (scheduler EulerAncestralDiscreteScheduler): euler_a, Trailing: "
            "applied its authors' settings --sampler euler_a --scheduler Trailing") in err
    assert "Sampler: Euler a," in infotext and "Schedule type: Trailing" in infotext


@pytest.mark.parametrize("kind, sampler", [("DDIMScheduler", "ddim"), ("EulerDiscreteScheduler", "euler"),
                                           ("EulerAncestralDiscreteScheduler", "euler_a")])
def test_a_folder_scheduler_on_trailing_timesteps_keeps_its_sampler(kind, sampler):
    from ldm.pipeline.presets import scheduler_preset

    preset = scheduler_preset({"_class_name": kind, "timestep_spacing": "trailing"})
    assert (preset.sampler, preset.scheduler) == (sampler, "Trailing")
    assert scheduler_preset({"_class_name": kind, "timestep_spacing": "leading"}) is None
