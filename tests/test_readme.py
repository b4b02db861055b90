"""The README stays true: every txt2img flag is in its table, img2img's own flags and defaults in its table, and its
commands name files that exist."""
import argparse
from pathlib import Path

from ldm.cli import img2img
from ldm.cli.arguments import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_every_flag_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    flags = [option for action in build_parser()._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    assert len(flags) > 30
    missing = [flag for flag in flags if f"| `{flag}` |" not in readme]
    assert not missing, f"README flag table lacks {missing}"


def missing_own_rows(script: str, build) -> tuple[dict[str, str], dict[str, str]]:
    """The flags of `script` that txt2img lacks or whose default differs, missing from (or with another default in)
    the README section "## `scripts/<script>.py`". An alias (--steps) has no default: its row names its flag."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"## `scripts/{script}.py`")[1].split("\n## ")[0]
    txt2img = {action.dest: action for action in build_parser()._actions}
    own = [action for action in build()._actions
           if action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help"
           and (action.dest not in txt2img or action.default != txt2img[action.dest].default)]
    rows = {action.option_strings[0]: "none" if action.default is None else "--ddim_steps" if
            action.default == argparse.SUPPRESS else str(action.default) for action in own}
    return rows, {flag: default for flag, default in rows.items() if f"| `{flag}` | `{default}`" not in section}


def test_img2img_flags_and_defaults_of_its_own_are_in_its_table():
    rows, missing = missing_own_rows("img2img", img2img.build_parser)
    assert {"--init-img", "--strength", "--outdir", "--n_iter", "--n_samples", "--scale"} <= set(rows)
    assert not missing, f"README img2img table lacks (or has another default for) {missing}"


def test_inpaint_flags_and_defaults_of_its_own_are_in_its_table():
    from ldm.cli import inpaint

    rows, missing = missing_own_rows("inpaint", inpaint.build_parser)
    assert {"--init-img", "--mask", "--strength", "--steps", "--outdir", "--n_samples", "--scale"} <= set(rows)
    assert not missing, f"README inpaint table lacks (or has another default for) {missing}"


def test_upscale_flags_and_defaults_of_its_own_are_in_its_table():
    from ldm.cli import upscale

    rows, missing = missing_own_rows("upscale", upscale.build_parser)
    assert {"--init-img", "--noise_level", "--prompt", "--outdir", "--n_samples", "--scale"} <= set(rows)
    assert not missing, f"README upscale table lacks (or has another default for) {missing}"


def test_readme_paths_exist():
    for path in ("constraints.txt", "scripts/txt2img.py", "scripts/img2img.py", "scripts/inpaint.py", "scripts/upscale.py",
                 "configs/stable-diffusion/x4-upscaling.yaml",
                 "configs/stable-diffusion/v1-inpainting-inference.yaml",
                 "configs/stable-diffusion/v2-inpainting-inference.yaml",
                 "configs/stable-diffusion/v1-inference.yaml",
                 "configs/stable-diffusion/v2-inference.yaml", "configs/stable-diffusion/v2-inference-v.yaml",
                 "models/ldm/stable-diffusion-v1/README.md", ".ci/run"):
        assert (ROOT / path).exists(), path
