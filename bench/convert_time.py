"""Wall time of ``itc.convert`` and of the CLI-like path (convert + save) on a BERT-base sized model.

Model: ``transformers.BertModel(BertConfig())`` (12 layers, hidden 768, 12 heads, HF's default attention), random
weights, eval mode, inputs ``input_ids`` and ``attention_mask`` of shape [1, 128].

Everything runs in one fresh subprocess, so the first ("cold") figures are what a one-shot CLI invocation pays:

- ``import``: torch, itnet_compiler and transformers imported;
- ``export``: ``itnet_compiler.frontend.export.export_model`` (torch.export non-strict, then itnet's importer; the
  warm rows also time ``torch.export.export`` and ``import_exported`` (the importer) on their own);
- ``recognise``: the pipeline's ``recognise`` phase (``pipeline.run(prog, phases=("recognise",))``) on that program;
- ``convert`` = export + recognise (exactly what ``itc.convert`` runs);
- ``save``: ``Program.save`` of the bundle (IR text, safetensors weights, meta.json) to a temporary directory;
- ``cli-like`` = import + model construction + convert + save.

Then the same steps are repeated warm (``--repeats`` times, medians). ``itc.build`` time and the built module's
max abs difference to eager are reported as a sanity check. Target: convert <= 20 s on the CPU.
``--profile`` prints a cProfile of one warm ``itc.convert`` (hot spots by cumulative and own time).

    python bench/convert_time.py [--quick] [--repeats 3] [--profile]
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGET_S = 20.0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _profile_text(fn, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def child(layers: int, seq: int, repeats: int, profile: bool) -> dict[str, object]:
    import torch
    from transformers import BertConfig, BertModel

    import itnet_compiler as itc
    from itnet_compiler.frontend.export import export_model, import_exported
    from itnet_compiler.passes import pipeline

    t_import = time.perf_counter() - _T_START
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=layers)
    model, t_model = _timed(lambda: BertModel(cfg).eval())
    g = torch.Generator().manual_seed(0)
    args = (torch.randint(0, cfg.vocab_size, (1, seq), generator=g),)
    kwargs = {"attention_mask": torch.ones(1, seq, dtype=torch.long)}
    params = sum(p.numel() for p in model.parameters())

    def save(prog) -> tuple[float, int]:
        with tempfile.TemporaryDirectory() as d:
            _, t = _timed(lambda: prog.save(Path(d) / "model.itir"))
            return t, _dir_bytes(Path(d))

    raw, t_export = _timed(lambda: export_model(model, args, kwargs))
    prog, t_recognise = _timed(lambda: pipeline.run(raw, phases=("recognise",)))
    t_save, bundle_bytes = save(prog)
    cold = {
        "import_s": t_import,
        "model_s": t_model,
        "export_s": t_export,
        "recognise_s": t_recognise,
        "convert_s": t_export + t_recognise,
        "save_s": t_save,
        "cli_like_s": t_import + t_model + t_export + t_recognise + t_save,
    }

    keys = ("torch_export_s", "importer_s", "export_s", "recognise_s", "convert_s", "save_s")
    warm: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(repeats):
        ep, t = _timed(lambda: torch.export.export(model, args, kwargs, strict=False))
        warm["torch_export_s"].append(t)
        _, t = _timed(lambda ep=ep: import_exported(ep))
        warm["importer_s"].append(t)
        raw, t = _timed(lambda: export_model(model, args, kwargs))
        warm["export_s"].append(t)
        _, t = _timed(lambda raw=raw: pipeline.run(raw, phases=("recognise",)))
        warm["recognise_s"].append(t)
        prog, t = _timed(lambda: itc.convert(model, args, kwargs))
        warm["convert_s"].append(t)
        warm["save_s"].append(save(prog)[0])
    warm_med = {k: statistics.median(v) for k, v in warm.items()}

    mod, t_build = _timed(lambda: itc.build(prog))
    with torch.no_grad():
        ref = model(*args, **kwargs).last_hidden_state
        got = mod(*args, **kwargs).last_hidden_state
    result = {
        "model": {
            "layers": layers,
            "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "seq": seq,
            "params": params,
            "attn_implementation": model.config._attn_implementation,
        },
        "ir": {
            "nodes": len(prog.nodes),
            "transforms": len(prog.transforms),
            "weights": len(prog.weights),
            "bundle_bytes": bundle_bytes,
        },
        "cold": cold,
        "warm_median": warm_med,
        "warm_all": warm,
        "build_s": t_build,
        "max_abs_diff_last_hidden_state": (ref - got).abs().max().item(),
        "torch_threads": torch.get_num_threads(),
    }
    if profile:
        result["profile"] = _profile_text(lambda: itc.convert(model, args, kwargs), top=25)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, seq 32, one warm repeat: a smoke run")
    ap.add_argument("--repeats", type=int, default=None, help="warm repeats (default 3; quick: 1)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one warm itc.convert")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    layers = opts.layers or (2 if opts.quick else 12)
    seq = opts.seq or (32 if opts.quick else 128)
    repeats = opts.repeats or (1 if opts.quick else 3)
    if opts.child:
        print(json.dumps(child(layers, seq, repeats, opts.profile)))
        return

    cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--seq", str(seq), "--repeats", str(repeats)]
    if opts.profile:
        cmd.append("--profile")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    m, ir, cold, warm = r["model"], r["ir"], r["cold"], r["warm_median"]
    print(
        f"BertModel: {m['layers']} layers, hidden {m['hidden']}, seq {m['seq']}, {m['params'] / 1e6:.1f} M params, "
        f"attention {m['attn_implementation']}; IR {ir['nodes']} nodes, {ir['transforms']} transforms, "
        f"bundle {ir['bundle_bytes'] / 2**20:.0f} MiB"
    )
    print(f"{'step':<28} {'cold s':>8} {'warm s':>8}")
    rows = [
        ("import torch+itnet+hf", cold["import_s"], None),
        ("build BertModel", cold["model_s"], None),
        ("export (export_model)", cold["export_s"], warm["export_s"]),
        ("  of which torch.export", None, warm["torch_export_s"]),
        ("  of which itnet importer", None, warm["importer_s"]),
        ("recognise (pipeline)", cold["recognise_s"], warm["recognise_s"]),
        ("convert = export+recognise", cold["convert_s"], warm["convert_s"]),
        ("save bundle", cold["save_s"], warm["save_s"]),
        ("cli-like: all of the above", cold["cli_like_s"], None),
    ]
    for name, c, w in rows:
        cs = f"{c:>8.2f}" if c is not None else f"{'':>8}"
        ws = f"{w:>8.2f}" if w is not None else f"{'':>8}"
        print(f"{name:<28} {cs} {ws}")
    share = cold["recognise_s"] / cold["convert_s"]
    meets = cold["convert_s"] <= TARGET_S
    print(
        f"recognise is {100 * share:.1f} % of a cold convert; build {r['build_s']:.2f} s; "
        f"max|built - eager| {r['max_abs_diff_last_hidden_state']:.2e}"
    )
    print(f"cold convert {cold['convert_s']:.2f} s, target <= {TARGET_S:g} s: {'met' if meets else 'MISSED'}")
    if "profile" in r:
        print(r["profile"])

    from _common import write_result

    payload = {"target": f"convert <= {TARGET_S} s", "meets_target": meets, "recognise_share_cold": share}
    payload.update({k: v for k, v in r.items() if k != "profile"})
    path = write_result("convert_time", payload, opts.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
