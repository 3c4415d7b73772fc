"""clq-compile: a torch.compile backend that quantizes diffusion transformers (W4A4 and more).

    qt = torch.compile(transformer, backend="clq", options={"bits": "w4a4"})
    with clq_compile.calibrating(qt):
        for inputs in calibration_inputs:
            qt(**inputs)
    out = qt(**inputs)                 # quantized from here on
    print(clq_compile.explain(qt))
"""

from .backend import clq_backend
from .calibration import calibrating
from .explain import explain, graphs, memory_report
from .options import Options, parse_options

__all__ = ["clq_backend", "calibrating", "explain", "graphs", "memory_report", "Options", "parse_options"]
__version__ = "0.1.0"
