"""Shared test helpers."""

from __future__ import annotations

import torch

from clq_compile.passes.capture import GraphAnalysis, capture


def dynamo_graph(model: torch.nn.Module, inputs: dict) -> tuple[torch.fx.GraphModule, list, GraphAnalysis]:
    """(gm, example_inputs, analysis) of the single graph Dynamo captures for model(**inputs).

    The analysis is taken inside the backend call: Dynamo drops the placeholders' `grapharg`
    metadata once the backend returns.
    """
    captured = []

    def grab(gm, example_inputs):
        captured.append((gm, example_inputs, capture(gm, example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=grab, fullgraph=True)(**inputs)
    (found,) = captured
    return found


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())
