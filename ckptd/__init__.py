"""ckptd: a checkpoint daemon and library for PyTorch training runs."""

__version__ = "0.1.0"
