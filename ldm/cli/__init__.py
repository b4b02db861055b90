"""The command-line tools (`scripts/txt2img.py`): argument checking, prompt files, numbered outputs, metadata."""
