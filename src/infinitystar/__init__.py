"""infinitystar: a clean PyTorch implementation of InfinityStar (arXiv 2511.04675)."""

__version__ = "0.1.0"
