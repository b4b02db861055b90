"""Text to image with Stable Diffusion: the CompVis script's flags, run by `ldm.cli.txt2img`.

    python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --plms
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ldm.cli.txt2img import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
