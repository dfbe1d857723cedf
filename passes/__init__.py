"""IR passes: the pass manager, the pattern matcher, cleanup, fusion, precision and quantization.

Importing this package registers every pass (`flagc.passes.manager.PASSES`).
"""

from flagc.passes import cleanup, fusion, padding, precision, quantize  # noqa: F401
from flagc.passes.manager import PASSES, PassContext, PassStats, register_pass, run_pipeline
from flagc.passes.pipeline import optimize, pipeline_for

__all__ = ["PASSES", "PassContext", "PassStats", "register_pass", "run_pipeline", "optimize",
           "pipeline_for"]
