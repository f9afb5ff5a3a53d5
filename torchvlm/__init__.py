"""torchvlm: pure-PyTorch vision-language models."""
__version__ = "0.1.0"
