"""`sgm.modules.GeneralConditioner` is where the SDXL configs' `conditioner_config` points."""
from sgm.modules.encoders.modules import GeneralConditioner

# What DiffusionEngine builds when a config has no conditioner: no embedders, an empty conditioning dict.
UNCONDITIONAL_CONFIG = {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": []}}

__all__ = ["GeneralConditioner", "UNCONDITIONAL_CONFIG"]
