"""Int8 layers vs float layers (error bounds), kernel schedules and the per-CPU kernel choice."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from pagedserve.layers.embedding import LMHead, VocabEmbedding
from pagedserve.layers.linear import Linear, QKVLinear
from pagedserve.layers.quantization import selection
from pagedserve.layers.quantization.int8 import dequantize, install_int8, quantize_layer_weight
from pagedserve.layers.quantization.kernels import (
    Int8KernelPlan,
    KernelSchedule,
    w8a8_mm,
    weight_only_mm,
)
from pagedserve.layers.quantization.selection import (
    QuantizedWeight,
    choose_int8_plan,
    measure_schedule,
)
from pagedserve.models.utils import default_torch_dtype


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


# ------------------------------------------------------------------ schedules and plans


def test_schedule_parse_print_and_lookup() -> None:
    schedule = KernelSchedule.parse("w8a8:1, int8_wo:8 ,dense")
    assert str(schedule) == "w8a8:1,int8_wo:8,dense"
    assert [schedule.kernel_for(m) for m in (1, 2, 8, 9, 4096)] == [
        "w8a8", "int8_wo", "int8_wo", "dense", "dense"]
    assert KernelSchedule.parse(str(schedule)) == schedule
    assert str(KernelSchedule.single("w8a8")) == "w8a8"
    assert schedule.uses("dense") and not KernelSchedule.single("w8a8").uses("dense")


@pytest.mark.parametrize("text", ["", "fp8", "int8_wo:8", "int8_wo,dense", "int8_wo:x,dense",
                                  "int8_wo:8,w8a8:4,dense", "int8_wo:0,dense"])
def test_bad_schedules_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError):
        KernelSchedule.parse(text)


def test_schedule_from_measured_choices_merges_runs() -> None:
    choices = [(1, "w8a8"), (2, "int8_wo"), (4, "int8_wo"), (8, "dense"), (64, "dense")]
    assert str(KernelSchedule.from_choices(choices)) == "w8a8:1,int8_wo:4,dense"


def test_plan_parse_defaults_and_errors() -> None:
    plan = Int8KernelPlan.parse("lm_head=int8_wo:4,w8a8", source="env")
    assert str(plan.lm_head) == "int8_wo:4,w8a8" and plan.linear.uses("int8_wo")
    assert str(Int8KernelPlan.parse(str(plan), source="env")) == str(plan)
    with pytest.raises(ValueError, match="linear="):
        Int8KernelPlan.parse("head=dense", source="env")


# ------------------------------------------------------------------ numerics


def test_weight_quantization_is_per_channel_symmetric_with_bf16_scales() -> None:
    torch.manual_seed(0)
    weight = torch.randn(300, 64) * torch.logspace(-3, 1, 300)[:, None]  # very different rows
    weight[7] = 0.0
    qweight, scale = quantize_layer_weight(weight, chunk_rows=64)  # several row blocks
    assert qweight.dtype == torch.int8 and scale.dtype == torch.float32
    assert int(qweight.abs().max()) <= 127
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # every kernel agrees on them
    assert not qweight[7].any()
    error = (dequantize(qweight, scale) - weight).abs()
    # Rounding to the nearest step, plus the bf16 rounding of the scale at the clamp.
    assert bool((error <= scale[:, None] * 0.51 + 1e-12).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_rows", [1, 3, 17, 64])
def test_int8_kernels_match_the_float_matmul(dtype: torch.dtype, num_rows: int) -> None:
    torch.manual_seed(num_rows)
    weight = torch.randn(96, 128) * 0.05
    x = torch.randn(num_rows, 128).to(dtype)
    qweight, scale = quantize_layer_weight(weight)
    exact = x.float() @ weight.t()
    on_quantized = x.float() @ dequantize(qweight, scale).t()
    weight_only = weight_only_mm(x, qweight, scale.to(torch.bfloat16))
    assert weight_only.dtype == dtype and weight_only.shape == (num_rows, 96)
    # Weight-only computes with the quantized weights exactly (bf16 activations aside).
    assert _rel_err(weight_only, on_quantized) < 1e-2
    w8a8 = w8a8_mm(x, qweight, scale)
    assert w8a8.dtype == torch.float32
    assert _rel_err(w8a8, on_quantized) < 1.5e-2  # + per-token activation rounding
    # Against the float weights: the int8 weight error dominates (~0.5% for Gaussian rows).
    assert _rel_err(weight_only, exact) < 2e-2 and _rel_err(w8a8, exact) < 2.5e-2
    out = torch.full((num_rows, 96), 7, dtype=torch.int32)
    assert torch.equal(w8a8_mm(x, qweight, scale, out=out), w8a8)  # into a given buffer


@pytest.mark.parametrize("kernel", ["dense", "int8_wo", "w8a8"])
def test_quantized_linear_vs_float_linear(kernel: str) -> None:
    torch.manual_seed(1)
    layer = QKVLinear(64, head_dim=16, num_heads=4, num_kv_heads=2, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight) * 0.1)
        layer.bias.copy_(torch.randn_like(layer.bias))
    x = torch.randn(2, 5, 64)  # any leading shape
    expected = F.linear(x, layer.weight, layer.bias)
    qweight, scale = quantize_layer_weight(layer.weight)
    install_int8(layer, qweight, scale, KernelSchedule.single(kernel))
    got = layer(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert _rel_err(got, expected) < (1e-6 if kernel == "dense" else 2e-2)
    # The float weight goes unless some row count still runs dense.
    assert (layer.weight is not None) == (kernel == "dense")
    q, k, v = layer.split(got)
    assert q.shape[-1] == 64 and k.shape[-1] == v.shape[-1] == 32


def test_strided_inputs_are_fine() -> None:
    weight = torch.randn(48, 64)
    qweight, scale = quantize_layer_weight(weight)
    wide = torch.randn(3, 256).bfloat16()
    want = wide[:, ::4].float() @ dequantize(qweight, scale).t()
    for x in (wide[:, ::4], wide[:, :64]):  # strided along K; strided rows
        assert _rel_err(weight_only_mm(x, qweight, scale.bfloat16()), want if x.stride(-1) != 1
                        else x.float() @ dequantize(qweight, scale).t()) < 1e-2


def test_schedule_switches_kernels_by_rows() -> None:
    torch.manual_seed(2)
    layer = Linear(64, 32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64))
    dense = layer.weight.detach().clone()
    qweight, scale = quantize_layer_weight(dense)
    install_int8(layer, qweight, scale, KernelSchedule.parse("int8_wo:2,dense"))
    small, large = torch.randn(2, 64), torch.randn(3, 64)
    assert torch.equal(layer(large), F.linear(large, dense))  # dense: exact
    assert torch.allclose(layer(small), weight_only_mm(small, qweight, scale.to(torch.bfloat16)))


def test_weight_only_needs_k_multiple_of_32_else_dense() -> None:
    layer = Linear(40, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 40))
    install_int8(layer, *quantize_layer_weight(layer.weight), KernelSchedule.single("int8_wo"))
    assert str(layer.quant_method.schedule) == "dense" and layer.weight is not None
    x = torch.randn(3, 40)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


@pytest.mark.parametrize("kernel", ["dense", "int8_wo", "w8a8"])
def test_tied_lm_head_gets_its_own_int8_copy(kernel: str) -> None:
    torch.manual_seed(3)
    with default_torch_dtype(torch.bfloat16):
        embedding = VocabEmbedding(500, 64, scale=8.0)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(500, 64))
    table = embedding.weight.detach().clone()
    head = LMHead(500, 64, tied_embedding=embedding, final_logit_softcapping=30.0)
    hidden = torch.randn(8, 64).bfloat16()
    expected = head(hidden)
    qweight, scale = quantize_layer_weight(embedding.weight)
    install_int8(head, qweight, scale, KernelSchedule.single(kernel), lm_head=True)
    ids = torch.tensor([0, 7, 499])
    assert torch.equal(embedding(ids), F.embedding(ids, table) * torch.tensor(8.0).bfloat16())
    assert torch.equal(embedding.weight, table)  # the lookup table is untouched
    for rows in (8, 1, 5):
        got = head(hidden[:rows])
        assert got.dtype == torch.float32 and got.shape == (rows, 500)
        assert _rel_err(got, expected[:rows]) < (1e-2 if kernel == "dense" else 3e-2)
        assert float(got.abs().max()) <= 30.0  # softcap applied
        buffer = torch.full((rows, 500), float("nan"))  # the runner's persistent buffer
        into = head(hidden[:rows], out=buffer)
        assert into.data_ptr() == buffer.data_ptr() and torch.equal(into, got)


# ------------------------------------------------------------------ kernel choice


def _weights(num: int, rows: int, cols: int) -> list[QuantizedWeight]:
    out = []
    for _ in range(num):
        dense = torch.randn(rows, cols).bfloat16()
        qweight, scale = quantize_layer_weight(dense)
        out.append(QuantizedWeight(qweight, scale, scale.bfloat16(), dense))
    return out


def test_measurement_picks_the_fastest_and_prefers_exact_on_ties(monkeypatch) -> None:
    """A fake clock: 'int8_wo' costs 1 + M, 'dense' costs 10, 'w8a8' costs 10 too."""
    cost = {"dense": 10.0, "int8_wo": None, "w8a8": 10.0}
    clock = [0.0]
    monkeypatch.setattr(selection.time, "perf_counter", lambda: clock[0])

    def fake_runner(kernel: str, weight: QuantizedWeight):
        def run(x: torch.Tensor) -> None:
            clock[0] += cost[kernel] if cost[kernel] is not None else 1.0 + x.shape[0]
        return run

    monkeypatch.setattr(selection, "_runner", fake_runner)
    schedule, timings = measure_schedule(_weights(1, 64, 64), ["dense", "int8_wo", "w8a8"], torch.bfloat16)
    # int8_wo wins while 1 + M < 10 / 1.05; from M=16 dense and w8a8 tie: dense (exact) wins.
    assert str(schedule) == "int8_wo:8,dense"
    assert set(timings) == set(selection.ROW_COUNTS)


def test_one_noisy_timing_does_not_flip_the_schedule() -> None:
    rows = [{"dense": 4.0, "int8_wo": 1.0}, {"dense": 2.0, "int8_wo": 1.0},
            {"dense": 1.0, "int8_wo": 1.6}, {"dense": 1.0, "int8_wo": 0.9},  # noise
            {"dense": 1.0, "int8_wo": 2.0}]
    assert selection.smooth_choices(rows) == ["int8_wo", "int8_wo", "dense", "dense", "dense"]
    clear = [{"dense": 4.0, "int8_wo": 1.0}, {"dense": 1.0, "int8_wo": 2.0}]
    assert selection.smooth_choices(clear) == ["int8_wo", "dense"]  # a real win switches
    tie = [{"dense": 1.0, "int8_wo": 0.97, "w8a8": 0.96}]
    assert selection.smooth_choices(tie) == ["dense"]  # within 5%: the exact kernel


def test_measured_plan_is_valid_quick_and_cached(tmp_path, monkeypatch) -> None:
    linear, head = _weights(2, 256, 128), _weights(1, 2048, 128)[0]
    cache = tmp_path / "plans.json"
    start = time.perf_counter()
    plan = choose_int8_plan(linear, head, torch.bfloat16, cache_path=cache)
    assert time.perf_counter() - start < 10
    assert plan.source == "measured" or plan.source.startswith("default")  # a busy machine
    assert not plan.linear.uses("w8a8")  # decoder linears never take W8A8 by measurement
    for schedule in (plan.linear, plan.lm_head):
        assert {schedule.kernel_for(m) for m in (1, 64, 10**6)} <= {"dense", "int8_wo", "w8a16", "w8a8"}
    if plan.source == "measured":  # the next start on this CPU reuses it
        monkeypatch.setattr(selection, "measure_schedule", lambda *a, **k: pytest.fail("measured"))
        again = choose_int8_plan(linear, head, torch.bfloat16, cache_path=cache)
        assert str(again) == str(plan) and again.source == "measured, cached"
        # Another thread count is another CPU as far as kernels go.
        monkeypatch.setattr(selection, "_plan_key", lambda *a: "other")
        with pytest.raises(pytest.fail.Exception):
            choose_int8_plan(linear, head, torch.bfloat16, cache_path=cache)


def test_a_measurement_that_overruns_gives_the_default_plan_uncached(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(selection, "_TOTAL_BUDGET_S", -1.0)
    cache = tmp_path / "plans.json"
    plan = choose_int8_plan(_weights(1, 64, 64), _weights(1, 64, 64)[0], torch.bfloat16, cache_path=cache)
    assert plan.source.startswith("default") and str(plan) == str(selection.default_plan("-"))
    assert not cache.exists()


def test_default_plan_follows_the_native_gemv(monkeypatch) -> None:
    monkeypatch.setattr(selection.gemv, "load_gemv", lambda: None)
    assert str(selection.default_plan("-")) == "linear=int8_wo:8,dense;lm_head=w8a8:1,int8_wo:8,w8a8"
    monkeypatch.setattr(selection.gemv, "load_gemv", lambda: object())
    assert str(selection.default_plan("-")) == "linear=w8a16:2,int8_wo:8,dense;lm_head=w8a8"


@pytest.mark.parametrize(("runs", "expected"), [
    (["linear=int8_wo;lm_head=w8a8"] * 2, "linear=int8_wo;lm_head=w8a8"),
    (["linear=w8a16:1,int8_wo;lm_head=w8a8", "linear=w8a16:2,int8_wo;lm_head=w8a8",
      "linear=w8a16:1,int8_wo;lm_head=w8a8"], "linear=w8a16:1,int8_wo;lm_head=w8a8"),
    (["linear=dense;lm_head=w8a8", "linear=int8_wo;lm_head=w8a8", "linear=w8a16;lm_head=w8a8"],
     None),
])
def test_a_near_tie_takes_a_third_measurement(runs, expected, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    queue = list(runs)
    monkeypatch.setattr(selection, "_measure_plan", lambda *a: (
        selection.Int8KernelPlan.parse(queue.pop(0), source="measured"), "timings"))
    cache = tmp_path / "plans.json"
    plan = choose_int8_plan(_weights(1, 64, 64), None, torch.bfloat16, cache_path=cache)
    assert queue == []  # two agreeing runs stop early; a disagreement takes a third
    if expected is None:
        assert plan.source.startswith("default") and not cache.exists()
    else:
        assert str(plan) == expected and plan.source == "measured" and cache.exists()


def test_override_skips_measurement(monkeypatch) -> None:
    monkeypatch.setattr(selection, "measure_schedule", lambda *a, **k: pytest.fail("measured"))
    plan = choose_int8_plan(_weights(1, 64, 64), None, torch.bfloat16, override="linear=dense;lm_head=w8a8")
    assert str(plan) == "linear=dense;lm_head=w8a8" and plan.source == selection.ENV_VAR
