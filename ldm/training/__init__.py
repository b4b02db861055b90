"""Training (`python main.py --base CONFIG -t`): PyTorch Lightning modules for the latent diffusion model and its
autoencoder, EMA, LoRA, and checkpoint export in the released key layout. Nothing in the inference path imports this
package; it needs the `train` extra (PyTorch Lightning)."""
