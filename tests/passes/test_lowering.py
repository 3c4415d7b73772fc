"""Lowering: the rewritten graph computes each quantized linear through clq::quant_linear."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clq_compile.options import parse_options
from clq_compile.passes.lowering import lower
from clq_compile.passes.weight_quantization import rtn
from tests.helpers import dynamo_graph


class TwoLayers(torch.nn.Module):
    def __init__(self, k, hidden, n):
        super().__init__()
        self.up = torch.nn.Linear(k, hidden)
        self.down = torch.nn.Linear(hidden, n, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@settings(max_examples=8)
@given(st.sampled_from([16, 32]), st.sampled_from([16, 48]), st.integers(1, 12), st.integers(1, 9),
       st.sampled_from(["w4a4", "w4a8", "w8a8"]), st.booleans())
def test_lowered_graph_equals_the_layers_composed_by_hand(k, hidden, n, tokens, bits, only_down):
    torch.manual_seed(k * hidden + n)
    model = TwoLayers(k, hidden, n)
    x = torch.randn(2, tokens, k)
    gm, example_inputs, analysis = dynamo_graph(model, {"x": x})
    opts = parse_options({"bits": bits}).method_configs().quantizer
    layers = {s.path: rtn(example_inputs[s.weight_index], opts) for s in analysis.sites}
    chosen = {s.node for s in analysis.sites if not only_down or s.path == "down"}
    lowered = lower(gm, analysis, layers, chosen, "reference")

    (out,) = lowered(*example_inputs)
    h = model.up(x) if only_down else layers["up"].forward(x, model.up.bias, "reference")
    expected = layers["down"].forward(torch.nn.functional.gelu(h), None, "reference")
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)

    calls = [node for node in lowered.graph.nodes if node.target is torch.ops.clq.quant_linear.default]
    assert sorted(c.name for c in calls) == sorted(["down"] if only_down else ["down", "up"])
    # Dynamo's graph is untouched and still computes the full-precision model.
    (fp,) = gm(*example_inputs)
    assert torch.allclose(fp, model(x), atol=1e-6)
