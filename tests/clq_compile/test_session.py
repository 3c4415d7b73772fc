"""The calibration session under careless use: other threads, nested blocks, empty calls, models
without values (meta), torch.compile's `mode=`, and models where nothing is selected."""

import threading

import pytest
import torch
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed

import clq_compile
from clq_compile import tiny_models
from clq_compile.calibration import model_state
from tests.clq_compile.test_bad_input import UpDown

OPTIONS = {"bits": "w4a4", "kernels": "reference"}
# A failing thread test must fail, not hang: every wait is bounded by this.
TIMEOUT_S = 120


def compile_clq(model, **options):
    return torch.compile(model, backend="clq", options={**OPTIONS, **options})


def dit_call(qt, seed):
    with torch.no_grad():
        return qt(**tiny_models.make_inputs("dit", seed=seed)).sample


def recorded_calls(qt) -> int:
    return sum(len(g.calibration.calls) for g in model_state(qt).graphs)


def up_down(seed=0):
    torch.manual_seed(seed)
    return UpDown().eval()


# Calibration belongs to the thread that entered calibrating() ----------------------------------


@pytest.mark.parametrize("before", ["full precision", "quantized"])
def test_other_threads_run_the_previous_state_and_are_not_recorded(before):
    torch._dynamo.reset()
    model = tiny_models.build("dit")
    qt = compile_clq(model, recipe="rtn")
    if before == "quantized":
        with torch.no_grad(), clq_compile.calibrating(qt):
            dit_call(qt, 100)
    expected = dit_call(model if before == "full precision" else qt, 3)

    started, left, stop = threading.Event(), threading.Event(), threading.Event()
    outputs, seen = [], {}

    def other_thread():
        while not stop.is_set():
            during = not left.is_set()
            out = dit_call(qt, 3)
            if during:  # began while the block was active (recording, or quantizing on exit)
                outputs.append(out)
            started.set()

    def calibrating_thread():
        with torch.no_grad(), clq_compile.calibrating(qt):
            dit_call(qt, 101)
            started.clear()
            seen["other started"] = started.wait(TIMEOUT_S)
            n = len(outputs)
            while len(outputs) < n + 2 and not stop.is_set():  # two whole calls inside the block
                started.wait(1)
            seen["recorded"] = recorded_calls(qt)
        left.set()

    other = threading.Thread(target=other_thread, daemon=True)
    calibrator = threading.Thread(target=calibrating_thread, daemon=True)
    try:
        calibrator.start()
        while not recorded_calls(qt) and calibrator.is_alive():
            calibrator.join(0.05)
        other.start()
        calibrator.join(TIMEOUT_S)
        assert not calibrator.is_alive(), "leaving calibrating() did not return while another thread ran the model"
    finally:
        stop.set()
        other.join(TIMEOUT_S)
    assert not other.is_alive() and left.is_set()
    assert seen == {"other started": True, "recorded": 1}
    # Every call the other thread began inside the block ran the previous state, or the new
    # quantization once the recipe had finished (just before the block returns).
    after = dit_call(qt, 3)
    assert sum(torch.equal(out, expected) for out in outputs) >= 2
    assert all(torch.equal(out, expected) or torch.equal(out, after) for out in outputs)
    state = model_state(qt)
    assert state.phase == "quantized" and state.calibrations == (1 if before == "full precision" else 2)


def test_calibrating_in_a_second_thread_while_one_is_active_is_refused():
    torch._dynamo.reset()
    qt = compile_clq(tiny_models.build("dit"), recipe="rtn")
    errors = []

    def second():
        try:
            with clq_compile.calibrating(qt):
                dit_call(qt, 5)
        except RuntimeError as error:
            errors.append(str(error))

    with torch.no_grad(), clq_compile.calibrating(qt):
        dit_call(qt, 100)
        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
        assert recorded_calls(qt) == 1
    assert len(errors) == 1 and "calibrating() is already active for this model in another thread" in errors[0]
    assert model_state(qt).calibrations == 1


# Nested calibrating() ---------------------------------------------------------------------------


def test_nested_calibrating_raises_at_entry_and_keeps_the_outer_session():
    torch._dynamo.reset()
    model = tiny_models.build("dit")
    qt = compile_clq(model, recipe="smoothquant")
    entered = False
    with torch.no_grad(), clq_compile.calibrating(qt):
        dit_call(qt, 100)
        with pytest.raises(RuntimeError, match=r"calibrating\(\) is already active for this model in this "
                                               r"thread: nested blocks are not supported"):
            with clq_compile.calibrating(qt):
                entered = True
        dit_call(qt, 101)
        assert recorded_calls(qt) == 2
    assert not entered
    state = model_state(qt)
    assert state.phase == "quantized" and state.calibrations == 1
    # The outer block's two calls are what it was calibrated on: the same as a plain calibration.
    torch._dynamo.reset()
    plain = compile_clq(tiny_models.build("dit"), recipe="smoothquant")
    with torch.no_grad(), clq_compile.calibrating(plain):
        dit_call(plain, 100)
        dit_call(plain, 101)
    assert torch.equal(dit_call(qt, 1), dit_call(plain, 1))


# An empty call -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["rtn", "smoothquant", "gptq", "clq"])
def test_an_empty_calibration_call_is_skipped_with_a_warning(recipe):
    torch._dynamo.reset()
    model = up_down()
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    qt = compile_clq(model, recipe=recipe)
    with torch.no_grad():
        with clq_compile.calibrating(qt):
            with pytest.warns(UserWarning, match=r"calibration call 0 \(counting from 0\) is empty: input 'x' has "
                                                 r"shape \[0, 8, 16\]\. It holds no data and is not recorded"):
                empty = qt(x[:0])
            qt(x)
            assert recorded_calls(qt) == 1
        assert empty.shape == (0, 8, 16)
        out, out_empty = qt(x), qt(x[:0])
    assert model_state(qt).calibrations == 1 and out_empty.shape == (0, 8, 16)
    # Quantized as if the empty call had not been made.
    torch._dynamo.reset()
    plain = compile_clq(up_down(), recipe=recipe)
    with torch.no_grad():
        with clq_compile.calibrating(plain):
            plain(x)
        assert torch.equal(out, plain(x))


# A model without values ------------------------------------------------------------------------

META_WEIGHTS = (r"the weights of 2 layer\(s\) selected for quantization are on the 'meta' device \(down, up\)")


def test_meta_model_is_refused_with_a_clear_error():
    torch._dynamo.reset()
    with torch.device("meta"):
        model = UpDown().eval()
    x = torch.randn(2, 8, 16, device="meta")
    qt = compile_clq(model, recipe="rtn")
    with pytest.raises(ValueError, match=r"parameters of this model are on the 'meta' device \(up\.weight, "
                                         r"up\.bias, down\.weight, down\.bias\).*Load the real weights"):
        with torch.no_grad(), clq_compile.calibrating(qt):
            qt(x)
    assert model_state(qt).phase == "captured" and recorded_calls(qt) == 0
    with pytest.raises(ValueError, match=META_WEIGHTS):
        with torch.no_grad():
            qt(x)  # data-free quantization at the first call


# torch.compile(..., mode=...) -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_compile_mode_is_refused_with_a_clear_error(mode):
    torch._dynamo.reset()
    qt = torch.compile(up_down(), backend="clq", mode=mode)
    with pytest.raises(BackendCompilerFailed, match=rf"backend 'clq' takes no mode= \(got {mode!r}\): its "
                                                    r"settings go in options=\{\.\.\.\}"):
        with torch.no_grad():
            qt(torch.randn(2, 8, 16))


# Nothing selected for quantization ---------------------------------------------------------------


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def test_a_model_without_linear_layers_says_so(tmp_path):
    torch._dynamo.reset()
    qt = compile_clq(NoLinear())
    with pytest.warns(UserWarning, match=r"calibrating\(\) has nothing to calibrate: this model has no linear "
                                         r"layers \(nn\.Linear or F\.linear with a parameter weight\)"):
        with torch.no_grad(), clq_compile.calibrating(qt):
            qt(torch.randn(1, 3, 4, 4))
    with pytest.raises(RuntimeError, match=r"nothing to save: this model has no linear layers"):
        clq_compile.save(qt, tmp_path / "a.safetensors")


def test_skip_everything_says_nothing_was_selected(tmp_path):
    torch._dynamo.reset()
    qt = compile_clq(up_down(), skip=["*"])
    with pytest.warns(UserWarning, match=r"calibrating\(\) has nothing to calibrate: none of this model's 2 "
                                         r"linear layers is selected for quantization \(2 kept: matches skip "
                                         r"pattern '\*'\)"):
        with torch.no_grad(), clq_compile.calibrating(qt):
            qt(torch.randn(2, 8, 16))
    for act in (lambda: clq_compile.save(qt, tmp_path / "a.safetensors"), lambda: clq_compile.release_weights(qt)):
        with pytest.raises(RuntimeError, match=r"none of this model's 2 linear layers is selected for "
                                               r"quantization \(2 kept: matches skip pattern '\*'\)"):
            act()
