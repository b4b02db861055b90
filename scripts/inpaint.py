"""Inpainting with Stable Diffusion: repaint the white part of a mask, run by `ldm.cli.inpaint`.

    python scripts/inpaint.py --ckpt sd-v1-5-inpainting.ckpt --init-img photo.png --mask mask.png \
        --prompt "a red sofa"
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ldm.cli.inpaint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
