"""Train a latent diffusion model or its autoencoder, as the CompVis repository's `main.py` does.

    python main.py --base configs/latent-diffusion/shapes.yaml -t [--resume logs/RUN] [--max_steps N]

Needs the `train` extra (PyTorch Lightning): pip install -e '.[train]'. See `python main.py --help`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from ldm.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
