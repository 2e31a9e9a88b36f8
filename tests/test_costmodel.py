"""Cost model, profiles, calibration and their CLI commands (DESIGN section 6)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from mars_ray.engine import cli as engine_cli
from mars_ray.engine.calibrate import (
    MeasuredPoint,
    PointsFileError,
    StepShape,
    fit_profile,
    load_points,
    predicted_ms,
)
from mars_ray.engine.costmodel import (
    PROFILES_DIR,
    CostModel,
    Profile,
    known_gpus,
    known_models,
    load_profile,
    save_profile,
)
from mars_ray.errors import ConfigError, MarsError, UnknownNameError

PAIRS = [(gpu, model) for gpu in known_gpus() for model in known_models()]
MOE = "qwen3-coder-30b-a3b"


def cost_model(gpu: str = "h100-80gb", model: str = "llama-3.1-8b") -> CostModel:
    return CostModel.from_names(gpu, model)


def profile_dict(gpu: str = "h100-80gb", model: str = "llama-3.1-8b") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PROFILES_DIR / f"{gpu}__{model}.json").read_text())
    return data


def with_constants(profile: Profile, **constants: float) -> Profile:
    """A copy of ``profile`` with gpu/engine constants replaced (section_field=value)."""
    data = profile.model_dump()
    for key, value in constants.items():
        section, _, field = key.partition("__")
        data[section][field] = value
    return Profile.model_validate(data)


# --- calibration targets -------------------------------------------------------------


def test_llama_h100_single_stream_tpot_matches_public_vllm_sweep() -> None:
    # Public sweep, Llama-3.1-8B on one H100: median TPOT 6.48 ms at concurrency 1.
    assert cost_model().step_ms([1024]) == pytest.approx(6.48, rel=0.15)


def test_llama_h100_small_batch_decode_stays_weight_bound() -> None:
    # Same sweep: 6.59 ms at concurrency 4 -- batching 4 decodes is almost free.
    cm = cost_model()
    assert cm.step_ms([1024] * 4) == pytest.approx(6.59, rel=0.15)
    assert cm.step_ms([1024] * 4) / cm.step_ms([1024]) < 1.1


def test_workload_facts_prefill_and_swap_of_a_10k_context() -> None:
    cm = cost_model()
    assert 250e-3 < cm.prefill_time_s(10_000, chunk_budget=2048) < 450e-3  # ~330 ms
    assert cm.swap_time_s(10_000) == pytest.approx(26e-3, rel=0.05)  # 1.3 GB at 50 GB/s
    assert cm.kv_bytes_per_token == 131_072


@pytest.mark.parametrize(
    ("model", "kv_bytes", "weight_gb"),
    [("llama-3.1-8b", 131_072, 16.1), ("qwen2.5-7b", 57_344, 15.2), (MOE, 98_304, 61.0)],
)
def test_model_facts_match_workload_facts(model: str, kv_bytes: int, weight_gb: float) -> None:
    profile = load_profile("h100-80gb", model)
    assert profile.kv_bytes_per_token == kv_bytes
    assert profile.model.weight_bytes / 1e9 == pytest.approx(weight_gb, rel=0.01)


# --- shape of the model --------------------------------------------------------------


@pytest.mark.parametrize(("gpu", "model"), PAIRS)
def test_more_work_is_never_faster(gpu: str, model: str) -> None:
    cm = cost_model(gpu, model)
    base = (8, 300, 8 * 2000, 0.0)
    for i, factor in ((0, 2), (1, 5), (2, 4)):
        bigger = list(base)
        bigger[i] *= factor
        assert cm.step_time_s(*bigger) >= cm.step_time_s(*base)
    times = [cm.step_time_s(1, n, 0, 0.0) for n in (1, 2, 8, 64, 256, 1024, 8192)]
    assert times == sorted(times)
    assert cm.step_ms([1000], [(512, 4000)]) > cm.step_ms([1000], [(512, 0)])


def test_moe_weight_read_grows_with_batch_and_saturates() -> None:
    cm = cost_model(model=MOE)
    model = cm.profile.model
    expert_bytes = model.weight_bytes * model.expert_weight_fraction
    one = cm.weight_read_bytes(1)
    assert one == pytest.approx(model.weight_bytes - expert_bytes * (1 - 8 / 128))
    reads = [cm.weight_read_bytes(n) for n in (1, 2, 4, 16, 64, 256)]
    assert reads == sorted(reads)
    assert cm.weight_read_bytes(512) == pytest.approx(model.weight_bytes, rel=1e-3)
    assert cm.step_ms([1024] * 64) > 3 * cm.step_ms([1024])  # batching is not free


def test_dense_weight_read_does_not_depend_on_batch() -> None:
    cm = cost_model()
    assert cm.weight_read_bytes(1) == pytest.approx(cm.weight_read_bytes(4096))


@pytest.mark.parametrize("model", known_models())
def test_h200_decodes_faster_than_h100(model: str) -> None:
    for batch in (1, 16, 128):
        h100 = cost_model("h100-80gb", model).step_ms([4096] * batch)
        h200 = cost_model("h200-141gb", model).step_ms([4096] * batch)
        assert h200 < h100


def test_step_ms_matches_step_time_s_arguments() -> None:
    cm = cost_model()
    units = CostModel.prefill_attn_units(512, 1000) + CostModel.prefill_attn_units(64, 0)
    assert units == 512 * (1000 + 256) + 64 * 32
    expected = cm.step_time_s(4, 2 + 512 + 64, 300 + 700 + 1000, units)
    assert cm.step_ms([300, 700], [(512, 1000), (64, 0)]) == pytest.approx(1e3 * expected)
    assert sum(cm.breakdown(4, 578, 2000, units)[i] for i in (0, 1, 3, 4)) == pytest.approx(
        expected
    )


def test_decode_time_closed_form_matches_stepping() -> None:
    cm = cost_model()
    stepped = sum(cm.step_time_s(1, 1, 5000 + i, 0.0) for i in range(100))
    assert cm.decode_time_s(100, 5000) == pytest.approx(stepped)
    assert cm.kv_read_s_per_token == pytest.approx(131_072 / 2.8e12)


# --- memory --------------------------------------------------------------------------


def test_llama_h100_kv_blocks_match_vllm_ballpark() -> None:
    blocks = cost_model().num_gpu_blocks(block_size=16, gpu_memory_utilization=0.9)
    assert 22_000 < blocks < 30_000  # vLLM: ~25k 16-token blocks (~400k tokens)


@pytest.mark.parametrize(("gpu", "model"), PAIRS)
def test_kv_blocks_positive_and_monotone(gpu: str, model: str) -> None:
    cm = cost_model(gpu, model)
    blocks = cm.num_gpu_blocks(16, 0.9)
    assert blocks > 0
    assert cm.num_gpu_blocks(16, 0.95) > blocks
    assert cm.num_gpu_blocks(32, 0.9) == pytest.approx(blocks / 2, abs=1)
    if gpu == "h100-80gb":
        assert cost_model("h200-141gb", model).num_gpu_blocks(16, 0.9) > blocks


def test_no_room_for_kv_names_gpu_and_model() -> None:
    with pytest.raises(ConfigError, match=rf"{MOE} on h100-80gb"):
        cost_model(model=MOE).num_gpu_blocks(16, 0.5)
    with pytest.raises(ConfigError):
        cost_model().num_gpu_blocks(0, 0.9)


# --- profiles ------------------------------------------------------------------------


def test_bundled_profiles_share_gpu_and_model_facts() -> None:
    for gpu in known_gpus():
        facts = {load_profile(gpu, m).gpu for m in known_models()}
        assert len(facts) == 1, gpu
    for model in known_models():
        facts_m = {load_profile(g, model).model for g in known_gpus()}
        assert len(facts_m) == 1, model


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="h100-80gb, h200-141gb"):
        load_profile("a100-40gb", "llama-3.1-8b")
    with pytest.raises(UnknownNameError, match=re.escape("llama-3.1-8b, qwen2.5-7b")):
        load_profile("h100-80gb", "llama-2-7b")


def test_profile_file_errors_name_file_and_key(tmp_path: Path) -> None:
    data = profile_dict()
    del data["gpu"]["b_eff_bytes_per_s"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json: gpu\.b_eff_bytes_per_s: Field required"):
        load_profile(path)

    data = profile_dict()
    data["model"]["num_layers"] = -3
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json: model\.num_layers"):
        load_profile(path)

    path.write_text('{"gpu": ')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        load_profile(path)


def test_every_constant_needs_provenance(tmp_path: Path) -> None:
    data = profile_dict()
    del data["provenance"]["engine.c0_s"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"no provenance for engine\.c0_s"):
        load_profile(str(path))


def test_profile_round_trips_through_a_file(tmp_path: Path) -> None:
    profile = load_profile("h200-141gb", MOE)
    path = save_profile(profile, tmp_path / "sub" / "copy.json")
    assert load_profile(path, MOE) == profile
    with pytest.raises(ConfigError, match=re.escape("not 'llama-3.1-8b'")):
        load_profile(path, "llama-3.1-8b")


# --- calibration ---------------------------------------------------------------------


def synthetic_points(cm: CostModel) -> list[MeasuredPoint]:
    shapes = [StepShape(b, b, b * ctx, 0.0) for b in (1, 4, 16, 64, 256) for ctx in (500, 8000)]
    for q, p in ((256, 0), (2048, 0), (8192, 0), (2048, 30_000)):
        shapes.append(StepShape(1, q, p, CostModel.prefill_attn_units(q, p)))
        shapes.append(StepShape(9, q + 8, p + 8 * 3000, CostModel.prefill_attn_units(q, p)))
    return [
        MeasuredPoint.single(f"p{i}", 1e3 * cm.step_time_s(*s), s) for i, s in enumerate(shapes)
    ]


@pytest.mark.parametrize("model", ["llama-3.1-8b", MOE])
def test_calibrate_recovers_known_constants(model: str) -> None:
    prior = load_profile("h100-80gb", model)
    truth = with_constants(
        prior,
        engine__c0_s=1.3e-3,
        engine__c_seq_s=35e-6,
        gpu__b_eff_bytes_per_s=2.4e12,
        gpu__f_eff_flops_per_s=480e12,
    )
    result = fit_profile(prior, synthetic_points(CostModel(truth)), sources=["synthetic"])
    for key, value in result.constants(truth).items():
        assert result.constants()[key] == pytest.approx(value, rel=0.02), key
    assert result.max_abs_rel_error < 0.01
    assert "fitted by mars-ray calibrate to synthetic" in (
        result.profile.provenance["gpu.b_eff_bytes_per_s"].detail
    )


def test_bench_result_becomes_tpot_and_ttft_points(tmp_path: Path) -> None:
    bench = {
        "max_concurrency": 1,
        "completed": 20,
        "total_input_tokens": 20 * 1024,
        "total_output_tokens": 20 * 128,
        "mean_tpot_ms": 6.5,
        "mean_ttft_ms": 32.0,
    }
    path = tmp_path / "c1.json"
    path.write_text(json.dumps(bench))
    tpot, ttft = load_points(path)
    assert tpot.components == ((1.0, StepShape(1.0, 1.0, 1024 + 64, 0.0)),)
    assert ttft.components[0][1].num_tokens == 1024
    cm = cost_model()
    assert predicted_ms(cm, tpot) == pytest.approx(6.5, rel=0.1)

    bench.update(max_concurrency=16, mean_tpot_ms=9.0)
    path.write_text(json.dumps(bench))
    (loaded,) = load_points(path)  # no TTFT point: queueing at concurrency 16
    weights = [w for w, _ in loaded.components]
    assert sum(weights) == pytest.approx(1.0) and len(weights) == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.json", "[{", "not valid JSON"),
        ("b.json", '{"foo": 1}', "expected a list of points"),
        ("c.json", '[{"num_seqs": 1}]', "'step_ms' must be a finite number"),
        ("d.csv", "num_seqs,step_ms\n1,2\n", "missing CSV column"),
        ("e.json", '{"mean_tpot_ms": 5, "completed": 3}', "total_input_tokens"),
    ],
)
def test_bad_points_files_raise_one_line_errors(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PointsFileError, match=message) as info:
        load_points(path)
    assert isinstance(info.value, MarsError) and "\n" not in str(info.value)


def test_points_from_csv_and_sequence_json(tmp_path: Path) -> None:
    csv_path = tmp_path / "steps.csv"
    csv_path.write_text(
        "num_seqs,num_tokens,kv_read_tokens,prefill_attn_units,step_ms\n4,4,4000,0,6.7\n"
    )
    json_path = tmp_path / "steps.json"
    json_path.write_text(
        json.dumps({"points": [{"decode_contexts": [1000, 3000], "step_ms": 6.7}]})
    )
    (from_csv,) = load_points(csv_path)
    (from_json,) = load_points(json_path)
    assert from_csv.components[0][1] == StepShape(4, 4, 4000, 0)
    assert from_json.components[0][1] == StepShape(2, 2, 4000, 0)


# --- CLI -----------------------------------------------------------------------------


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    engine_cli.register(app)
    return app


def test_costmodel_command_prints_json(app: typer.Typer) -> None:
    args = ["costmodel", "--gpu", "h100-80gb", "--model", "llama-3.1-8b"]
    result = CliRunner().invoke(app, [*args, "--decode-seqs", "1", "--context", "1024", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["step_ms"] == pytest.approx(cost_model().step_ms([1024]))
    assert "kv_read_ms" in out

    result = CliRunner().invoke(app, [*args, "--prefill-tokens", "2048", "--prior-context", "100"])
    assert result.exit_code == 0 and "compute-bound" in result.output


def test_calibrate_command_writes_a_loadable_profile(app: typer.Typer, tmp_path: Path) -> None:
    points = [
        {"num_seqs": s.num_seqs, "num_tokens": s.num_tokens, "kv_read_tokens": s.kv_read_tokens,
         "prefill_attn_units": s.prefill_attn_units, "step_ms": p.step_ms}
        for p in synthetic_points(cost_model())
        for _, s in p.components
    ]  # fmt: skip
    points_path, out = tmp_path / "points.json", tmp_path / "fitted.json"
    points_path.write_text(json.dumps(points))
    args = ["calibrate", "--points", str(points_path), "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    fit = json.loads(result.output)
    assert fit["max_abs_rel_error"] < 0.01
    profile = load_profile(out)
    detail = profile.provenance["engine.c0_s"].detail
    assert str(points_path) in detail and dt.date.today().isoformat() in detail
