"""flagc: an ahead-of-time export toolchain for transformer models."""

__version__ = "0.1.0"
