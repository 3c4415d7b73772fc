"""clq-compile: a torch.compile backend that quantizes diffusion transformers (W4A4 and more).

    qt = torch.compile(transformer, backend="clq", options={"bits": "w4a4"})
    with clq_compile.calibrating(qt):
        for inputs in calibration_inputs:
            qt(**inputs)
    out = qt(**inputs)                 # quantized from here on
    print(clq_compile.explain(qt))
    clq_compile.save(qt, "model-w4a4.safetensors")      # later: qt = clq_compile.load(model, path)
"""

from .backend import clq_backend
from .calibration import calibrating
from .deploy import load, release_weights, save
from .explain import explain, explain_artifact, graphs, memory_report
from .options import Options, parse_options

__all__ = ["clq_backend", "calibrating", "explain", "explain_artifact", "graphs", "load", "memory_report",
           "Options", "parse_options", "release_weights", "save"]
__version__ = "0.1.0"
