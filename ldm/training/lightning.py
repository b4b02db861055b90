"""PyTorch Lightning under one name, from whichever distribution is installed (`lightning` or `pytorch-lightning`)."""
from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError("training needs PyTorch Lightning: pip install -e '.[train]' (or pip install lightning)"
                          ) from error

__all__ = ["pl"]
