"""The end-to-end benchmark, the training run and their plots at a tiny scale (seconds), so
that they cannot rot: every variant runs, the reports hold what the README quotes."""
import json

import pytest

pytest.importorskip("transformers")

from trove import bench_e2e, plot, train_e2e  # noqa: E402
from trove.e2e import Shape  # noqa: E402


def test_scaled_shapes_keep_peer_on_the_third_from_last_and_last_layers():
    assert Shape().peer_layers == (19, 21)
    assert Shape.scaled(1.0) == Shape()
    small = Shape.scaled(0.125)
    assert small.layers == 3 and small.peer_layers == (0, 2)
    assert small.hidden == 256 and small.hidden % small.heads == 0
    assert small.experts == 317 ** 2
    assert Shape.scaled(0.5).peer_layers == (8, 10)
    with pytest.raises(ValueError):
        Shape.scaled(0)


def test_bench_runs_every_variant_and_reports_tokens_per_second(tmp_path, capsys):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    assert bench_e2e.main(["--scale", "0.03", "--experts", "256", "--batch", "1,2", "--seq", "8",
                           "--iters", "1", "--warmup", "0", "--in-process", "--threads", "1",
                           "--workdir", str(tmp_path / "w"), "--json", str(out),
                           "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    assert [v["variant"] for v in report["variants"]] == ["torch", "trove", "trove-host",
                                                          "trove-engram-host",
                                                          "trove-engram-ahead"]
    # Engram at layers 1 and 5, clamped to the 3-layer model; its tables beyond the host tier.
    assert report["shape"]["engram_layers"] == [1, 2]
    eng = report["variants"][3]
    assert 0 < eng["engram_host_budget_bytes"] < eng["engram_store_bytes"]
    assert "host_budget_bytes" not in eng  # PEER all resident
    assert eng["by_batch"][0]["last_engram_stats"]["misses"] > 0
    assert all(r["forward_engram_s"] > 0 for v in report["variants"] for r in v["by_batch"])
    for v in report["variants"]:
        assert [r["batch"] for r in v["by_batch"]] == [1, 2]
        for r in v["by_batch"]:
            assert r["forward_tokens_per_s"] > 0 and r["train_tokens_per_s"] > 0
            assert r["train_peer_backward_s"] > 0 and r["forward_peer_s"] > 0
        assert v["rss_peak_bytes"] > 0
    host = report["variants"][2]
    assert 0 < host["host_budget_bytes"] < host["store_bytes"]
    assert host["by_batch"][0]["last_peer_stats"]["host"]["misses"] > 0
    assert "| 2 x 8 | trove-host |" in capsys.readouterr().out
    assert png.stat().st_size > 0
    assert plot.main([str(out), "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 0


def test_training_run_reports_both_validation_losses_and_the_gap(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "run.json"
    png = tmp_path / "loss.png"
    assert train_e2e.main(["--text", str(text), "--vocab", "300", "--scale", "0.03",
                           "--experts", "64", "--steps", "3", "--batch", "2", "--seq", "16",
                           "--eval-every", "2", "--eval-batches", "1", "--threads", "1",
                           "--json", str(out), "--plot", str(png)]) == 0
    report = json.loads(out.read_text())
    fp32, int4 = report["runs"]["fp32"], report["runs"]["int4"]
    assert [s for s, _ in fp32["val"]] == [0, 2, 3] == [s for s, _ in int4["val"]]
    assert len(int4["train_loss"]) == 3
    assert report["gap"] == pytest.approx(int4["final_val_loss"] - fp32["final_val_loss"])
    assert png.stat().st_size > 0
    assert plot.main([str(out), "-o", str(tmp_path / "again.png")]) == 0


def test_row_adagrad_moves_only_touched_rows_by_the_int4sr_rule():
    import torch
    w = torch.nn.Parameter(torch.ones(3, 4))
    w.grad = torch.tensor([[0.0] * 4, [1.0, -1.0, 2.0, -2.0], [0.0] * 4])
    opt = train_e2e.RowAdagrad([w], lr=0.1)
    opt.step()
    g = w.grad[1]
    a = 0.1 / (g.square().mean().sqrt() + 1e-8)
    assert torch.equal(w[0].detach(), torch.ones(4)) and torch.equal(w[2].detach(), torch.ones(4))
    assert torch.allclose(w[1].detach(), 1 - a * g)
    assert opt.accum[0][1] == pytest.approx(2.5)


def test_bench_runs_the_torch_peer_in_bf16_forward_only(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_e2e.main(["--scale", "0.03", "--experts", "256", "--batch", "1", "--seq", "8",
                           "--iters", "1", "--warmup", "0", "--in-process", "--variants", "torch",
                           "--torch-dtype", "bf16", "--no-train", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["variants"][0]["by_batch"]
    assert row["forward_tokens_per_s"] > 0 and "train_tokens_per_s" not in row
