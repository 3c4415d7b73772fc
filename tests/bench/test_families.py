"""bench/families.py on the families whose structure differs (tiny configs, the reference kernels)."""

import pytest
import torch

from tests.bench.bench_scripts import import_bench

(families,) = import_bench("families")


# Breaks its graph inside every block on its own (Dynamo traces each block's frame separately).
GRAPH_BREAK_FAMILY = "MochiTransformer3DModel"


@pytest.mark.parametrize("name", families.CI_FAMILIES)
def test_family_compiles_and_quantizes(name):
    torch.set_num_threads(1)
    row = families.measure(name, calls=1, cells=(("w8a8", "rtn"),))
    assert row["eager"] and row["w16a16_identical"]
    assert 0 < row["w8a8_rtn"] < 0.05
    assert row["quantized"] > 0
    # Kept layers are the ones the policy promises to keep, whatever the family calls them.
    assert all("kept in 16 bit" in reason or "odd" in reason for reason in row["kept"]), row["kept"]
    if name == GRAPH_BREAK_FAMILY:
        model, _ = families.build(name)
        linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert row["graphs"] > 1
        assert set(row["kept_layers"]) <= linears  # model-absolute paths, not a block's frame's


def test_every_exported_class_is_measured_or_skipped_with_a_reason():
    exported = families.exported_classes()
    assert set(families.SPECS) <= set(exported)
    assert set(families.NOT_A_DIT) <= set(exported)
