"""Calibration: learned low-rank features fitted once on calibration inputs, saved in the bundle, reused by builds.

A GPT-2 (transformers, built offline) is converted with every attention on ``lowrank:method=learned``; the fitted
program's bundle is loaded and built again, and must give bit-identical outputs on new inputs without fitting
anything (the fitting routine is made to fail). Hostile or stale fitted data is one ``ItnetError``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch._subclasses.fake_tensor import FakeTensor

import itnet_compiler as itc
from itnet_compiler.backends.torch import lowrank as LR
from itnet_compiler.cli import main

PLAN = {"*": "lowrank:method=learned,rank=8,steps=4,calib=64,chunk=16"}


@pytest.fixture(scope="module")
def gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2, use_cache=False,
                                  attn_implementation="sdpa")  # fmt: skip
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(1))
    return model, itc.convert(model, (ids,)), ids


def ids_(seed: int) -> torch.Tensor:
    return torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(seed))


def test_fitted_factors_round_trip_through_the_bundle_and_are_not_refitted(gpt2, tmp_path, monkeypatch):
    model, prog, ids = gpt2
    fitted = itc.calibrate(prog, [ids], plan=PLAN)
    layers = {t.name for t in prog.transforms}
    assert set(fitted.meta["fitted"]) == layers
    assert all(t.lowering.startswith("lowrank:") for t in fitted.transforms)
    fitted.save(str(tmp_path / "m.itir"))
    assert (tmp_path / "m.itir" / "fitted.safetensors").exists()
    with torch.no_grad():
        want = itc.build(fitted)(ids_(7)).last_hidden_state
        refit = itc.build(prog, plan=PLAN)(ids_(7)).last_hidden_state  # fits on these inputs instead

    real_fit = LR.fit_features

    def no_fitting(q, *a, **k):
        if isinstance(q, FakeTensor) or q.is_meta:  # the build's type check runs lowerings on fake tensors
            return real_fit(q, *a, **k)
        raise AssertionError("a calibrated bundle must not fit its features again")

    monkeypatch.setattr(LR, "fit_features", no_fitting)
    loaded = itc.load(tmp_path / "m.itir")
    with torch.no_grad():
        got = itc.build(loaded)(ids_(7)).last_hidden_state
    assert torch.equal(got, want)
    assert not torch.equal(got, refit)  # the stored factors are what ran, not a fit on the new inputs
    eager = model(ids_(7)).last_hidden_state
    assert ((got - eager).norm() / eager.norm()).item() < 1.0  # an approximation of the model, not noise


def test_stored_factors_differ_from_their_favor_start_and_match_the_layer(gpt2):
    _, prog, ids = gpt2
    fitted = itc.calibrate(prog, ids, plan=PLAN)
    (layer, entry), *_ = sorted(fitted.meta["fitted"].items())
    assert entry["kind"] == "LearnedFeatures" and entry["tensors"] == ["omega_k", "omega_q"]
    oq = fitted.fitted[f"{layer}::omega_q"]
    assert list(oq.shape) == [2, 8, 16]  # heads, rank, head dim
    gen = torch.Generator().manual_seed(0)
    start = torch.stack([LR.orthogonal_gaussian(8, 16, gen, torch.float64) for _ in range(2)])
    assert not torch.allclose(oq.double(), start)


def corrupt(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_hostile_or_stale_fitted_data_is_one_error(gpt2, tmp_path):
    _, prog, ids = gpt2
    good = tmp_path / "good.itir"
    itc.calibrate(prog, ids, plan=PLAN).save(str(good))

    def meta_edit(fn):
        def edit(d: Path):
            meta = json.loads((d / "meta.json").read_text())
            fn(meta)
            (d / "meta.json").write_text(json.dumps(meta))

        return edit

    def wrong_shape(d: Path):
        t = safetensors.torch.load_file(str(d / "fitted.safetensors"))
        safetensors.torch.save_file({k: v[:1].contiguous() for k, v in t.items()}, str(d / "fitted.safetensors"))

    with pytest.raises(itc.ItnetError, match="no fitted.safetensors; re-run itnet calibrate"):
        itc.load(corrupt(good, tmp_path / "a", lambda d: (d / "fitted.safetensors").unlink()))
    with pytest.raises(itc.ItnetError, match="'fitted' is malformed"):
        itc.load(corrupt(good, tmp_path / "b", meta_edit(lambda m: m.__setitem__("fitted", {"x": {"kind": 3}}))))
    unknown = corrupt(good, tmp_path / "c", meta_edit(lambda m: [e.__setitem__("kind", "os.system")
                                                                 for e in m["fitted"].values()]))  # fmt: skip
    with pytest.raises(itc.ItnetError, match="kind 'os.system' are unknown"):
        itc.build(itc.load(unknown))
    missing = corrupt(good, tmp_path / "d", meta_edit(lambda m: [e["tensors"].append("omega_z")
                                                                 for e in m["fitted"].values()]))  # fmt: skip
    with pytest.raises(itc.ItnetError, match="lacks .*omega_z"):
        itc.load(missing)
    m = itc.build(itc.load(corrupt(good, tmp_path / "e", wrong_shape)))
    with pytest.raises(itc.ItnetError, match=r"layer '.*': fitted low-rank features are for 1 heads"):
        m(ids)


def test_cli_calibrate_then_run(tmp_path, capsys):
    cfg = tmp_path / "gpt2.json"
    cfg.write_text(json.dumps({"vocab_size": 100, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}))
    src, out = tmp_path / "g.itir", tmp_path / "g-cal.itir"
    ids = "input_ids:1x48:int64"
    assert main(["convert", "hf:GPT2Model", "--config", str(cfg), "-o", str(src), "--input", ids]) == 0
    capsys.readouterr()
    spec = "*=lowrank:method=learned,rank=8,steps=3,calib=32,chunk=16"
    code = main(["calibrate", str(src), "-o", str(out), "--lowering", spec])
    text = capsys.readouterr().out
    assert code == 0 and "fitted 2 layer(s)" in text and "LearnedFeatures (omega_k, omega_q)" in text
    code = main(["run", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2 lowrank" in captured.out
    assert main(["calibrate", str(src), "-o", str(tmp_path / "none.itir")]) == 0
    assert "fitted 0 layer(s)" in capsys.readouterr().out
    code = main(["calibrate", str(src), "-o", str(tmp_path / "x.itir"), "--calib-data", str(tmp_path / "nope.st")])
    assert code != 0 and "no file" in capsys.readouterr().err
