"""Add-ons: what a pipeline can do beside text to image, each behind the protocol of `base.AddOn`."""
