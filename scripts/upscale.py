"""Upscale an image 4x with Stability's SD 2 x4 upscaler, run by `ldm.cli.upscale`.

    python scripts/upscale.py --ckpt x4-upscaler-ema.ckpt --init-img low.png --prompt "a white cat" \
        --noise_level 20 --ddim_steps 50 --scale 9
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ldm.cli.upscale import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
