"""bench/families.py on the families whose structure differs (tiny configs, the reference kernels)."""

import pytest
import torch

from tests.bench.bench_scripts import import_bench

(families,) = import_bench("families")

# Layers no family may keep: they process tokens (the policy keeps conditioning, modulation,
# embeddings and the final projection only).
TOKEN_REASON = "token GEMM"


@pytest.mark.parametrize("name", families.CI_FAMILIES)
def test_family_compiles_and_quantizes(name):
    torch.set_num_threads(1)
    row = families.measure(name, calls=1, cells=(("w8a8", "rtn"),))
    assert row["eager"] and row["w16a16_identical"]
    assert 0 < row["w8a8_rtn"] < 0.05
    assert row["quantized"] > 0
    assert not any(TOKEN_REASON in reason for reason in row["kept"])
    # Kept layers are the ones the policy promises to keep, whatever the family calls them.
    assert all("kept in 16 bit" in reason for reason in row["kept"]), row["kept"]


def test_a_graph_break_inside_a_block_still_quantizes_every_block():
    torch.set_num_threads(1)
    model, inputs = families.build("MochiTransformer3DModel")
    row = families.measure("MochiTransformer3DModel", calls=1, cells=(("w8a8", "rtn"),))
    assert row["graphs"] > 1
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(row["kept_layers"]) <= linears


def test_every_exported_class_is_measured_or_skipped_with_a_reason():
    exported = families.exported_classes()
    assert set(families.SPECS) <= set(exported)
    assert set(families.NOT_A_DIT) <= set(exported)
