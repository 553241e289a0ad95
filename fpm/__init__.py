"""fpm: reproduce and study the FPM model family (arXiv 2111.04909) with DeepSpeed."""

__version__ = "0.1.0"
