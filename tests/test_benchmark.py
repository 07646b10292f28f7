"""The benchmark runs end to end on a tiny plan and reports consistent figures."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import mixed_catalog

from uniseg_components import cli
from uniseg_components.benchmark import count_parameters, time_interleaved
from uniseg_components.methods import METHODS, get_method
from uniseg_components.methods.uniseg import UniSeg
from uniseg_components.methods.uniseg.benchmark import format_report, run_benchmark
from uniseg_components.tasks import TaskCatalog


def test_time_interleaved_orders_calls_and_takes_medians():
    calls = []
    times = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert len(times) == 2 and all(t >= 0 for t in times)


def test_run_benchmark_on_demo_plan(tmp_path):
    torch.set_num_threads(1)
    cat = TaskCatalog.builtin("demo").select(dims=3)
    res = run_benchmark(cat, patch_size=(16, 16, 16), repeats=1, device="cpu", volume_factor=1.5)
    net = UniSeg.from_catalog(cat)  # parameters are reported at the catalog's patch, not the timed one
    assert res["params_uniseg"] == count_parameters(net)
    assert res["params_prompt_fuse"] == net.prompt.numel() + count_parameters(net.fuse)
    assert res["all_tasks_n"] == 3
    for key in ("train_step_ratio", "all_tasks_ratio", "sw_voxels_per_s"):
        assert res[key] > 0
    # one encoder pass for three tasks cannot cost more FLOPs than three full passes
    assert 1 / 3 < res["all_tasks_flop_bound"] < 1
    assert res["sw_volume"] == [24, 24, 24]
    report = format_report(res)
    assert "(b) training step" in report and "voxels/s" in report
    # (e) FLOPs per step: UniSeg's prompt and FUSE add work to the same backbone; rates follow from the timed steps
    eff = res["efficiency"]
    assert set(eff) == {"UniSeg", "plain backbone"} and eff["UniSeg"]["tflop"] > eff["plain backbone"]["tflop"] > 0
    for e in eff.values():
        assert e["tflop_s"] == pytest.approx(e["tflop"] / e["s"])
        assert e["peak_share"] == pytest.approx(e["tflop_s"] * 1e12 / res["matmul_peak_flops"])
        assert e["compiled_s"] is None and e["peak_gib"] is None  # CPU: not compiled by default, no GPU memory
    assert "(e) UniSeg" in report and "% of peak" in report
    assert get_method("uniseg").format_benchmark(res) == report  # the method protocol reaches the same report
    # the CLI writes the same kind of table
    out = tmp_path / "bench.md"
    text = cli.benchmark(catalog="demo", patch="16,16,16", repeats=1, device="cpu", write=str(out), model="uniseg")
    assert out.read_text().strip() == text.strip()
    assert text.startswith("### uniseg") and "(b) training step" in text


def test_meduniseg_benchmark_on_demo_plan():
    from uniseg_components.methods.meduniseg import MedUniSeg
    from uniseg_components.methods.meduniseg.benchmark import format_report as format_meduniseg_report
    from uniseg_components.methods.meduniseg.benchmark import run_benchmark as run_meduniseg_benchmark

    torch.set_num_threads(1)
    cat = TaskCatalog.builtin("demo")
    res = run_meduniseg_benchmark("demo", patch_size=(16, 16, 16), repeats=1, device="cpu", volume_factor=1.5)
    assert res["params_meduniseg"] == count_parameters(MedUniSeg.from_catalog(cat))
    assert res["num_tasks"] == len(cat)
    assert res["params_single_models"] > 3 * res["params_meduniseg"]  # one backbone per task
    assert res["patch_2d"] == [16, 16] and res["sliding_2d"]["size"] == [24, 24]
    for dims in ("3d", "2d"):
        step = res[f"train_step_{dims}"]
        assert step["meduniseg_s"] > 0 and step["backbone_s"] > 0
        assert res[f"sliding_{dims}"]["per_s"] > 0
    assert set(res["efficiency"]) == {"MedUniSeg 3D", "plain 3D backbone", "MedUniSeg 2D", "plain 2D backbone"}
    assert all(e["tflop"] > 0 for e in res["efficiency"].values())
    report = format_meduniseg_report(res)
    assert "2D sliding-window throughput" in report and "single-task nnU-Nets" in report
    assert METHODS["meduniseg"].format_benchmark(res) == report


def test_hermes_benchmark_on_demo_plan():
    from uniseg_components.methods.hermes import Hermes
    from uniseg_components.methods.hermes.benchmark import format_report as format_hermes_report
    from uniseg_components.methods.hermes.benchmark import run_benchmark as run_hermes_benchmark

    torch.set_num_threads(1)
    cat = TaskCatalog.builtin("demo").select(dims=3)
    res = run_hermes_benchmark("demo", patch_size=(16, 16, 16), repeats=1, device="cpu", volume_factor=1.5)
    net = Hermes.from_catalog(cat)
    assert res["params_hermes"] == count_parameters(net)
    assert res["params_fusion"] == count_parameters(net.fusion) and 0 < res["fusion_share"] < 1
    assert res["params_tokens"] == count_parameters(net.priors)
    assert res["all_targets_n"] == sum(t.num_classes - 1 for t in cat)
    for key in ("train_step_ratio", "all_targets_ratio", "sw_voxels_per_s"):
        assert res[key] > 0
    assert res["sw_volume"] == [24, 24, 24]
    assert res["efficiency"]["Hermes"]["tflop"] > res["efficiency"]["plain backbone"]["tflop"] > 0
    report = format_hermes_report(res)
    assert "prior-fusion layers" in report and "one pass per target" in report
    assert METHODS["hermes"].format_benchmark(res) == report


def test_loader_benchmark_on_small_synthetic_ct(tmp_path):
    from uniseg_components.data_benchmark import format_loader_report, run_loader_benchmark, write_synthetic_ct

    items = write_synthetic_ct(tmp_path / "ct", 1, shape=(64, 48, 20))
    lab = np.asarray(nib.load(items[0]["label"]).dataobj)
    assert set(np.unique(lab)) == {0, 1, 2}  # organ and tumour present
    torch.set_num_threads(1)
    res = run_loader_benchmark(
        mixed_catalog(),
        cases=2,
        workers=[0, 1],
        batches=3,
        repeats=1,
        device="cpu",
        shape=(64, 48, 20),
        patch_size=(16, 16, 12),
    )
    assert set(res["batches_per_s"]) == {"0", "1"} and all(v > 0 for v in res["batches_per_s"].values())
    assert res["task"] == "organ_ct" and res["patch"] == [16, 16, 12] and res["model_step_s"] > 0
    report = format_loader_report(res)
    assert "loader, 1 worker(s)" in report and "UniSeg training step, patch 16x16x12" in report
    # worker counts without the default one: the ratio uses the fastest measured
    other = {**res, "default_workers": 7}
    assert "fastest loader / model step rate" in format_loader_report(other)


def test_scale_benchmark_reports_peak_memory_per_case_count(tmp_path):
    from uniseg_components.data_benchmark import format_scale_report, run_scale_benchmark

    res = run_scale_benchmark((2, 4), batches=2, workers=1, shape=(64, 48, 24), patch=(32, 32, 16))
    assert set(res["runs"]) == {"disk 2", "disk 4", "ram 2", "ram 4"}
    for r in res["runs"].values():
        assert r["self_mb"] > 100 and r["children_mb"] > 0
    assert res["runs"]["disk 4"]["cache_mb"] > 1.5 * res["runs"]["disk 2"]["cache_mb"] > 0  # every case on disk
    assert res["runs"]["ram 4"]["cache_mb"] == 0
    assert "| on disk (`--cache_dir`) | 4 |" in format_scale_report(res)


def test_inference_benchmark_counts_every_study_on_one_and_two_ranks(tmp_path):
    """`benchmark --model infer`: each rank count segments every study once, in a fresh command; the table has a row
    per rank count with its speed-up over one rank."""
    from uniseg_components.checkpoints import save_checkpoint
    from uniseg_components.data_benchmark import format_inference_report, run_inference_benchmark

    cat = TaskCatalog.builtin("demo").select(dims=3)
    for i in range(3):
        vol = np.random.RandomState(i).normal(0, 100, (20, 20, 12)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 2.5, 1.0])), str(tmp_path / f"case{i}.nii.gz"))
    ckpt = save_checkpoint(tmp_path / "model.pt", UniSeg.from_catalog(cat, features=[4, 8, 16, 16]), cat)
    res = run_inference_benchmark(tmp_path, ckpt, ranks=(1, 2), device="cpu", work_dir=tmp_path / "work")
    assert [(r["ranks"], r["studies"], r["failed"]) for r in res["runs"]] == [(1, 3, 0), (2, 3, 0)]
    assert all(0 < r["studies_per_s"] <= r["in_run_studies_per_s"] for r in res["runs"])
    assert len(list((tmp_path / "work" / "out_2").glob("case*_abdomen_ct.nii.gz"))) == 3
    table = format_inference_report(res)
    assert "| 1 | " in table and "| 2 | 1 | 3 | 0 |" in table and "1.00x" in table


def test_profile_step_script_profiles_every_model(tmp_path):
    """scripts/profile_step.py (the profiler half of scripts/gpu_check.sh) on the demo plan, CPU: one table per model
    with its operator count and a Chrome trace each."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_step.py"
    run = subprocess.run(
        [sys.executable, str(script), "--catalog", "demo", "--steps", "1", "--rows", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for name, trace in (
        ("plain backbone", "plain_backbone"),
        ("UniSeg", "uniseg"),
        ("MedUniSeg 3D", "meduniseg_3d"),
        ("Hermes", "hermes"),
    ):
        assert f"### {name} (patch" in run.stdout
        assert json.loads((tmp_path / f"{trace}.json").read_text())["traceEvents"]
    counts = [float(line.split(", ")[1].split()[0]) for line in run.stdout.splitlines() if "per step," in line]
    assert len(counts) == 4 and counts[3] > counts[0] > 0  # Hermes' fusion blocks: many more operators
