"""flagc: an ahead-of-time export toolchain for transformer models."""

__version__ = "0.1.0"

from flagc.dsl.compute_graph import ComputeGraph  # noqa: E402

__all__ = ["ComputeGraph", "__version__", "build", "load"]


def build(*args, **kwargs):
    """Build an artifact folder; see flagc.api.build."""
    from flagc.api import build as _build

    return _build(*args, **kwargs)


def load(*args, **kwargs):
    """Load an artifact (folder or engine file); see flagc.api.load."""
    from flagc.api import load as _load

    return _load(*args, **kwargs)
