"""The README stays true: every txt2img flag is in its table, and its commands name files that exist."""
from pathlib import Path

from ldm.cli.arguments import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_every_flag_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    flags = [option for action in build_parser()._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    assert len(flags) > 30
    missing = [flag for flag in flags if f"| `{flag}` |" not in readme]
    assert not missing, f"README flag table lacks {missing}"


def test_readme_paths_exist():
    for path in ("constraints.txt", "scripts/txt2img.py", "configs/stable-diffusion/v1-inference.yaml",
                 "configs/stable-diffusion/v2-inference.yaml", "configs/stable-diffusion/v2-inference-v.yaml",
                 "models/ldm/stable-diffusion-v1/README.md", ".ci/run"):
        assert (ROOT / path).exists(), path
