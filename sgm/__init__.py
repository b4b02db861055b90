"""Stability AI's generative-models (`sgm`) import paths, so the released SDXL yaml configs instantiate unchanged.

A thin layer: every class here reuses the `ldm` modules (UNet, text encoders, autoencoder, schedule algebra) by
subclassing or re-export and only adapts constructor signatures and the sgm conditioning interface.
"""
