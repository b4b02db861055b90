"""The sampler registry (ldm/models/diffusion/samplers.py): one entry per sampler knows its canonical name, its
aliases and AUTOMATIC1111's display name; the display names equal those the metadata writer printed before the
registry held them."""
from __future__ import annotations

import itertools
import re

import pytest
import torch

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import (CompVisSamplerSpec, DDIMCFGPPSpec, KSamplerSpec, available_samplers,
                                           resolve_sampler, resolves_img2img, sample_img2img, sampler_display_name)
from toy_diffusion import NonlinearToyDiffusion

# The metadata writer's own table and rule (ldm/cli/metadata.py before the registry held display names), kept here as
# the reference the registry must reproduce name for name.
OLD_DISPLAY_NAMES = {
    "ddim": "DDIM", "plms": "PLMS", "dpmsolver": "DPM-Solver", "euler": "Euler", "eulera": "Euler a",
    "eulerancestral": "Euler a", "heun": "Heun", "dpm2": "DPM2", "dpm2a": "DPM2 a", "dpm2ancestral": "DPM2 a",
    "lms": "LMS", "dpmpp2sa": "DPM++ 2S a", "dpmpp2sancestral": "DPM++ 2S a", "dpmpp2m": "DPM++ 2M",
    "dpmppsde": "DPM++ SDE", "dpmpp2msde": "DPM++ 2M SDE", "unipc": "UniPC",
    # added with the samplers since (issue 13): AUTOMATIC1111 1.10's labels, Forge's for the Euler CFG++ pair
    "dpmpp2msdeheun": "DPM++ 2M SDE Heun", "dpmpp3msde": "DPM++ 3M SDE", "dpmfast": "DPM fast",
    "dpmadaptive": "DPM adaptive", "dpmad": "DPM adaptive", "restart": "Restart", "lcm": "LCM",
    "ddimcfgpp": "DDIM CFG++", "eulercfgpp": "Euler CFG++", "eulerancestralcfgpp": "Euler Ancestral CFG++",
    "euleracfgpp": "Euler Ancestral CFG++",
}
OLD_SUFFIXES = {"karras": "Karras", "exponential": "Exponential"}


def old_display_name(name: str) -> str:
    squeezed = re.sub(r"[^a-z0-9]", "", name.lower().replace("++", "pp"))
    for suffix, label in OLD_SUFFIXES.items():
        if squeezed.endswith(suffix) and squeezed[: -len(suffix)] in OLD_DISPLAY_NAMES:
            return f"{OLD_DISPLAY_NAMES[squeezed[: -len(suffix)]]} {label}"
    return OLD_DISPLAY_NAMES.get(squeezed, name)


def spellings() -> list[str]:
    """Every registered name and alias, the display names, schedule suffixes on each, and odd spellings."""
    stems = set(available_samplers()) | set(OLD_DISPLAY_NAMES.values())
    for name in available_samplers():
        stems.update(resolve_sampler(name).aliases)
    stems.update(["k_euler_a", "k_lms", "dpm_2_ancestral", "DPM+++ 2M", "dpm+2m", "DPM++2M", "dpmpp-2m-sde",
                  "EULER-A", "Euler  a", "new_one", "", "karras", "exponential", "ddim karras", "DPM++ 3M SDE",
                  "uni_pc", "DPM-Solver++", "lcm", "Euler a Karras Karras"])
    suffixed = {f"{stem}{joiner}{suffix}" for stem, joiner, suffix in
                itertools.product(stems, ("_", " ", ""), ("karras", "Karras", "exponential", "Exponential"))}
    return sorted(stems | suffixed)


def test_display_names_are_the_metadata_writers():
    names = spellings()
    assert len(names) > 500
    different = {name: (sampler_display_name(name), old_display_name(name)) for name in names
                 if sampler_display_name(name) != old_display_name(name)}
    assert not different


@pytest.mark.parametrize("name", available_samplers())
def test_every_sampler_answers_to_its_display_name(name):
    spec = resolve_sampler(name)
    assert sampler_display_name(name) == spec.display_name
    assert resolve_sampler(spec.display_name) is spec
    for alias in spec.aliases:
        assert resolve_sampler(alias) is spec
        assert sampler_display_name(alias) == spec.display_name


@pytest.mark.parametrize("name, shown", [("dpmpp_2m_karras", "DPM++ 2M Karras"), ("euler_a", "Euler a"),
                                         ("ddim", "DDIM"), ("plms", "PLMS"), ("dpm_solver", "DPM-Solver"),
                                         ("unipc", "UniPC"), ("dpm2_a_karras", "DPM2 a Karras"),
                                         ("dpmpp_2m_sde", "DPM++ 2M SDE"), ("k_euler_a", "k_euler_a")])
def test_a1111_display_names(name, shown):
    assert sampler_display_name(name) == shown


def test_families_and_what_they_can_do():
    for name in available_samplers():
        spec = resolve_sampler(name)
        assert isinstance(spec, (KSamplerSpec, CompVisSamplerSpec, DDIMCFGPPSpec))
        if isinstance(spec, KSamplerSpec):
            assert spec.compvis is None and spec.can_start_from_image
            assert spec.can_hand_off == (name not in ("dpm_fast", "dpm_adaptive"))  # they span a sigma range
        elif isinstance(spec, DDIMCFGPPSpec):
            assert spec.can_start_from_image and not spec.can_hand_off
        else:
            assert not spec.can_hand_off
            assert spec.can_start_from_image == (name == "ddim")
    assert resolve_sampler("ddim").sampler_class is DDIMSampler
    assert resolve_sampler("dpmpp_2m_karras").function is k_sampling.sample_dpmpp_2m
    assert resolve_sampler("dpmpp_2m_karras").schedule == "karras"
    assert [name for name in available_samplers() if resolves_img2img(name)] == [
        name for name in available_samplers() if name not in ("plms", "dpm_solver")]


@pytest.mark.parametrize("name", ["plms", "dpm_solver"])
def test_samplers_that_cannot_start_from_an_image_say_so(name):
    toy = NonlinearToyDiffusion()
    with pytest.raises(ValueError, match="cannot start from an image"):
        sample_img2img(toy, name, 4, torch.zeros(1, 4, 4, 4), 0.5, None, None, 1.0, ImageNoise([0]))


def test_a_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule 'linear'"):
        KSamplerSpec(name="x", display_name="X", function=k_sampling.sample_euler, schedule="linear")
