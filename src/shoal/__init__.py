"""Shoal: self-hosted GPT-style language models, served and fine-tuned on your own machine."""

__version__ = "0.1.0"
