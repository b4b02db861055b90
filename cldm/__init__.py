"""ControlNet (Zhang et al. 2023) under the import paths of lllyasviel/ControlNet, so `cldm_v15.yaml` resolves."""
