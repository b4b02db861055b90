"""Image to image with Stable Diffusion: the CompVis img2img script's flags, run by `ldm.cli.img2img`.

    python scripts/img2img.py --prompt "A fantasy landscape, trending on artstation" --init-img sketch.jpg \
        --strength 0.8
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ldm.cli.img2img import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
