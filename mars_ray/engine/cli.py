"""``mars-ray costmodel`` and ``mars-ray calibrate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mars_ray.engine.costmodel import CostModel, Profile, load_profile, save_profile
from mars_ray.errors import ConfigError

GpuOpt = Annotated[str, typer.Option("--gpu", help="GPU name, e.g. h100-80gb")]
ModelOpt = Annotated[str, typer.Option("--model", help="model name, e.g. llama-3.1-8b")]
ProfileOpt = Annotated[
    Path | None, typer.Option("--profile", help="profile JSON file (instead of --gpu/--model)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def register(app: typer.Typer) -> None:
    """Add the ``costmodel`` and ``calibrate`` commands to ``app``."""
    app.command("costmodel")(costmodel_command)
    app.command("calibrate")(calibrate_command)


def _profile(gpu: str, model: str, profile_path: Path | None) -> Profile:
    return load_profile(profile_path) if profile_path else load_profile(gpu, model)


def costmodel_command(
    gpu: GpuOpt = "h100-80gb",
    model: ModelOpt = "llama-3.1-8b",
    profile: ProfileOpt = None,
    decode_seqs: Annotated[int, typer.Option(min=0, help="decoding sequences")] = 0,
    context: Annotated[int, typer.Option(min=0, help="context tokens of each decode")] = 1024,
    prefill_tokens: Annotated[int, typer.Option(min=0, help="prefill chunk tokens")] = 0,
    prior_context: Annotated[int, typer.Option(min=0, help="cached tokens before the chunk")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Time of one engine step: DECODE_SEQS decodes at CONTEXT plus one prefill chunk."""
    if decode_seqs == 0 and prefill_tokens == 0:
        raise ConfigError("nothing to cost: give --decode-seqs and/or --prefill-tokens")
    cost_model = CostModel(_profile(gpu, model, profile))
    prefills = [(prefill_tokens, prior_context)] if prefill_tokens else []
    args = CostModel.step_args([context] * decode_seqs, prefills)
    parts = cost_model.breakdown(*args)
    result = {
        "step_ms": 1e3 * parts.total_s,
        "gpu": cost_model.profile.gpu.name,
        "model": cost_model.profile.model.name,
        "num_seqs": args[0],
        "num_tokens": args[1],
        "kv_read_tokens": args[2],
        "overhead_ms": 1e3 * parts.overhead_s,
        "dense_ms": 1e3 * parts.dense_s,
        "compute_bound": parts.compute_bound,
        "kv_read_ms": 1e3 * parts.kv_read_s,
        "prefill_attn_ms": 1e3 * parts.prefill_attn_s,
    }
    if as_json:
        typer.echo(json.dumps(result))
        return
    bound = "compute" if parts.compute_bound else "weight-read"
    typer.echo(
        f"step {result['step_ms']:.3f} ms on {result['gpu']} / {result['model']}: "
        f"{decode_seqs} decodes at {context} tokens + {prefill_tokens}-token prefill"
    )
    typer.echo(
        f"  dense layers {result['dense_ms']:.3f} ms ({bound}-bound), "
        f"kv read {result['kv_read_ms']:.3f} ms, "
        f"prefill attention {result['prefill_attn_ms']:.3f} ms, "
        f"overhead {result['overhead_ms']:.3f} ms"
    )


def calibrate_command(
    points: Annotated[
        list[Path], typer.Option("--points", help="points file (repeatable): JSON, CSV, bench")
    ],
    out: Annotated[Path, typer.Option("--out", help="where to write the fitted profile JSON")],
    gpu: GpuOpt = "h100-80gb",
    model: ModelOpt = "llama-3.1-8b",
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit c0_s, c_seq_s, B_eff and F_eff of a profile to measured points."""
    from mars_ray.engine.calibrate import calibrate_files  # numpy: load on use

    result = calibrate_files(_profile(gpu, model, profile), points)
    save_profile(result.profile, out)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "out": str(out)}))
        return
    prior = result.constants(result.prior)
    for key, value in result.constants().items():
        typer.echo(f"{key:24s} {prior[key]:12.4g} -> {value:12.4g}")
    for r in result.residuals:
        typer.echo(
            f"  {r.label}: measured {r.measured_ms:.3f} ms, model {r.predicted_ms:.3f} ms "
            f"({100 * r.rel_error:+.1f}%)"
        )
    typer.echo(
        f"relative error: mean {100 * result.mean_abs_rel_error:.1f}%, "
        f"max {100 * result.max_abs_rel_error:.1f}%; wrote {out}"
    )
