"""A sweep's reports from fake records: the tables, the paired differences by hand, and the
runs' analyses gathered and averaged by head count."""

import math

import numpy as np
import pytest
from test_experiments import base_config, fake_record

from vit_jax import sweep, sweep_plots, sweep_report


def test_summary_table_and_plot_from_fake_records(tmp_path):
  runs = sweep.plan(base_config(), heads=[1, 2], seeds=[0, 1, 2], qkv_modes=["fused", "identity"])
  accuracies = {0: 0.90, 1: 0.92, 2: 0.94}
  records = [fake_record(r, accuracies[r.seed] - (r.qkv == "identity") * 0.1, c)
             for r, c in runs]
  rows = sweep_report.summarize(records)
  assert len(rows) == 4
  fused_1 = next(r for r in rows if r["qkv"] == "fused" and r["heads"] == 1)
  assert fused_1["accuracy_mean"] == pytest.approx(0.92)
  assert fused_1["accuracy_std"] == pytest.approx(0.02)  # sample std of .90 .92 .94
  assert fused_1["seeds"] == 3 and fused_1["head_dim"] == 16
  paths = sweep_report.write_reports(records, tmp_path)
  table = (tmp_path / "summary.md").read_text()
  assert "| fused | 1 | 16 | 16 | 100 | 3 | 92.00 ± 2.00 % |" in table
  assert "| identity | 2 | 16 | 8 | 200 | 3 | 82.00 ± 2.00 % |" in table
  assert len((tmp_path / "runs.csv").read_text().splitlines()) == 13
  # The plot draws the numbers: other accuracies, another picture.
  other = [{**r, "eval_accuracy": r["eval_accuracy"] / 2} for r in records]
  sweep_plots.plot(sweep_report.summarize(other), tmp_path / "other.png")
  assert paths[3].name == "sweep.png"
  assert paths[3].read_bytes() != (tmp_path / "other.png").read_bytes()
  # One seed has no spread to report, not a spread of 0.
  one_seed = [r for r in records if r["seed"] == 0]
  assert math.isnan(sweep_report.summarize(one_seed)[0]["accuracy_std"])
  assert "| fused | 1 | 16 | 16 | 100 | 1 | 90.00 % |" in sweep_report.markdown_table(
      sweep_report.summarize(one_seed))
  sweep_plots.plot(sweep_report.summarize(one_seed), tmp_path / "one_seed.png")  # no bars
  # identity is 0.1 below fused on every seed: the paired difference, with no spread.
  assert "| identity | fused | 2 | 16 | 3 | -10.00 | [-10.00, -10.00] |" in table


def test_paired_differences_and_their_95_percent_interval_by_hand():
  runs = sweep.plan(base_config(), heads=[2], seeds=[0, 1, 2, 3], qkv_modes=["fused", "tied_qk"])
  fused = {0: 0.90, 1: 0.80, 2: 0.95, 3: 0.70}  # far apart: only pairing removes the seeds'
  diff = {0: 0.01, 1: 0.02, 2: 0.03, 3: None}   # seed 3 has no tied_qk run
  records = [fake_record(r, fused[r.seed] + (diff[r.seed] if r.qkv == "tied_qk" else 0), c)
             for r, c in runs if r.qkv == "fused" or diff[r.seed] is not None]
  (row,) = sweep_report.paired_differences(records)
  assert (row["qkv"], row["heads"], row["seeds"]) == ("tied_qk", 2, 3)
  assert row["difference_mean"] == pytest.approx(0.02)
  # t(0.975, 2 degrees of freedom) = 4.3027; the differences' sample std is 0.01.
  half = 4.302653 * 0.01 / math.sqrt(3)
  assert row["ci95_low"] == pytest.approx(0.02 - half, rel=1e-5)
  assert row["ci95_high"] == pytest.approx(0.02 + half, rel=1e-5)


def write_analysis(folder, run, done=("zero", "mean")):
  """Instrument CSVs as analyze writes them: a drop of 0.01 * heads * (seed + 1) per head;
  `done`: the ablations whose analysis finished (their markers written)."""
  folder.mkdir(parents=True)
  for ablation in done:
    (folder / f"done_{ablation}").write_text("100 test images\n")
  drop = 0.01 * run.heads * (run.seed + 1)
  (folder / "head_importance.csv").write_text(
      "layer,head,loss,accuracy,accuracy_drop\n"
      + "".join(f"{layer},{h},0.1,0.8,{drop + layer * h / 100}\n" for layer in (0, 1)
                for h in range(run.heads)))
  head_dim = run.hidden_size // run.heads
  (folder / "projection_spectra.csv").write_text(
      "layer,head,matrix,effective_rank,singular_values\n"
      + "".join(f"0,{h},{m},{head_dim / 2},{h + 1} {run.seed + 1}\n"
                for h in range(run.heads) for m in ("W_Q", "W_QK")))
  (folder / "head_importance_mean.csv").write_text(  # a tenth of the zeroed drop
      "layer,head,loss,accuracy,accuracy_drop\n"
      + "".join(f"0,{h},0.1,0.8,{drop / 10}\n" for h in range(run.heads)))
  (folder / "attention_statistics.csv").write_text(  # distance 10 + layer + seed
      "layer,head,entropy,mean_distance_pixels\n"
      + "".join(f"{layer},{h},1.0,{10 + layer + run.seed}\n" for layer in (0, 1, 2)
                for h in range(run.heads)))
  (folder / "head_redundancy.csv").write_text(  # 0 on the diagonal, 0.3 * heads off it
      "layer,head_a,head_b,js_divergence\n"
      + "".join(f"0,{a},{b},{0.3 * run.heads * (a != b)}\n" for a in range(run.heads)
                for b in range(run.heads)))


def test_reports_gather_each_runs_analysis_and_average_it_by_head_count(tmp_path):
  runs = sweep.plan(base_config(), heads=[1, 2], seeds=[0, 1])
  records = [fake_record(r, 0.9, c) for r, c in runs]
  for run, _ in runs:
    write_analysis(tmp_path / run.name / "analysis", run)
  paths = sweep_report.write_reports(records, tmp_path)
  gathered = (tmp_path / "analysis_head_importance.csv").read_text().splitlines()
  assert gathered[0] == "run,qkv,heads,hidden_size,seed,layer,head,loss,accuracy,accuracy_drop"
  assert len(gathered) == 1 + 2 * ((1 + 1) + (2 + 2))  # every head of every run
  assert gathered[1].startswith(f"{runs[0][0].name},fused,1,16,0,0,0,")
  means = sweep_report.analysis_by_heads(tmp_path)
  assert means["fused"][1]["accuracy_drop"] == pytest.approx(0.015)  # seeds: 0.01, 0.02
  assert means["fused"][2]["accuracy_drop"] == pytest.approx(0.03 + 0.0025)  # + layer 1 head 1
  assert means["fused"][2]["qk_rank_share"] == pytest.approx(0.5)  # W_Q rows left out
  assert means["fused"][2]["accuracy_drop_mean_ablation"] == pytest.approx(0.003)
  assert means["fused"][1]["distance_first_layer"] == pytest.approx(10.5)  # seeds 0 and 1
  assert means["fused"][1]["distance_last_layer"] == pytest.approx(12.5)
  assert means["fused"][2]["js_divergence"] == pytest.approx(0.6)  # the diagonal left out
  assert "js_divergence" not in means["fused"][1]  # one head: no pair to compare
  table = (tmp_path / "analysis_by_heads.csv").read_text().splitlines()
  assert table[0] == "qkv,heads," + ",".join(sweep_report.BY_HEADS_COLUMNS)
  assert table[1].startswith("fused,1,0.015,0.0015,0.5,10.5,12.5,") and table[1].endswith(",")
  # One model per head count, seed 0 unless asked: its drops as (layers, heads), its spectra.
  models = sweep_report.models_by_heads(tmp_path, "fused")
  assert sorted(models) == [1, 2]
  np.testing.assert_allclose(models[2]["drops"], [[0.02, 0.02], [0.02, 0.03]])
  assert models[2]["qk_spectra"] == {(0, 0): [1.0, 1.0], (0, 1): [2.0, 1.0]}
  np.testing.assert_allclose(
      sweep_report.models_by_heads(tmp_path, "fused", seed=1)[1]["drops"], [[0.02], [0.02]])
  assert sweep_report.models_by_heads(tmp_path, "identity") == {}
  assert [p.name for p in paths[-3:]] == ["analysis_by_heads.csv", "analysis_by_heads.png",
                                          "analysis_models_fused.png"]
  assert all(p.stat().st_size > 0 for p in paths[-3:])
  # A later report of other runs (here: heads 2 only, its analyses gone) keeps nothing of it.
  two = [r for r in records if r["heads"] == 2]
  for record in two:
    for marker in (tmp_path / record["name"] / "analysis").glob("done_*"):
      marker.unlink()
  sweep_report.write_reports(two, tmp_path)
  assert not list(tmp_path.glob("analysis_*"))


def test_a_root_of_records_with_and_without_a_newer_field_reports(tmp_path):
  runs = sweep.plan(base_config(), heads=[1, 2], seeds=[0])
  old, new = (fake_record(r, 0.9, c) for r, c in runs)
  old.pop("resumed", None)  # written before the field was added
  new["resumed"] = False
  sweep_report.write_reports([old, new], tmp_path)
  header, *rows = (tmp_path / "runs.csv").read_text().splitlines()
  assert "resumed" in header.split(",") and len(rows) == 2


def test_an_unfinished_analysis_is_left_out_of_the_gathered_tables(tmp_path):
  runs = sweep.plan(base_config(), heads=[1], seeds=[0, 1, 2])
  records = [fake_record(r, 0.9, c) for r, c in runs]
  for (run, _), done in zip(runs, [("zero", "mean"), ("zero",), ()], strict=True):
    write_analysis(tmp_path / run.name / "analysis", run, done)
  sweep_report.collect_analyses(records, tmp_path)
  def runs_in(name):
    lines = (tmp_path / f"analysis_{name}").read_text().splitlines()[1:]
    return sorted({line.split(",")[0] for line in lines})
  names = [run.name for run, _ in runs]
  assert runs_in("head_importance.csv") == runs_in("attention_statistics.csv") == names[:2]
  assert runs_in("head_importance_mean.csv") == names[:1]  # seed 1's mean ablation never ran


def test_a_one_layer_model_s_only_layer_is_its_first_and_its_last(tmp_path):
  (tmp_path / "analysis_attention_statistics.csv").write_text(
      "run,qkv,heads,hidden_size,seed,layer,head,entropy,mean_distance_pixels\n"
      "r0,fused,2,16,0,0,0,1.0,6.0\n"
      "r0,fused,2,16,0,0,1,1.0,8.0\n")
  means = sweep_report.analysis_by_heads(tmp_path)["fused"][2]
  assert means["distance_first_layer"] == means["distance_last_layer"] == pytest.approx(7.0)


def test_an_analysis_counts_as_done_only_on_the_image_count_asked_for(tmp_path):
  from vit_jax import analyze

  assert not analyze.is_done(tmp_path, "zero", 100)
  analyze.done_marker(tmp_path, "zero").write_text("100 test images\n")  # as analyze writes it
  assert analyze.is_done(tmp_path, "zero", 100)
  assert not analyze.is_done(tmp_path, "zero", 1000)  # --analysis_images changed: redone
  assert not analyze.is_done(tmp_path, "mean", 100)


def test_a_redone_analysis_is_not_done_while_it_runs(tmp_path, monkeypatch):
  # An analysis interrupted while redone (say, on more images) must not leave the old
  # marker beside its half-rewritten tables: a sweep report would take them as finished.
  from vit_jax import analyze

  analyze.done_marker(tmp_path, "zero").write_text("100 test images\n")
  config = base_config()
  monkeypatch.setattr(analyze.inference, "restore_with_test_images",
                      lambda *args: (config, None, None, None))

  def interrupted(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(analyze.analysis, "collect_attention", interrupted)
  with pytest.raises(KeyboardInterrupt):
    analyze.analyze_checkpoint(config, tmp_path, num_images=100, output_dir=tmp_path)
  assert not analyze.is_done(tmp_path, "zero", 100)
  # Another ablation on other images rewrites the shared tables: zero's marker goes too.
  analyze.done_marker(tmp_path, "zero").write_text("100 test images\n")
  with pytest.raises(KeyboardInterrupt):
    analyze.analyze_checkpoint(config, tmp_path, num_images=50, output_dir=tmp_path,
                               ablations=("mean",))
  assert not analyze.done_marker(tmp_path, "zero").exists()


def test_the_analyses_plot_draws_each_ablation_there_is_in_points(monkeypatch):
  monkeypatch.setattr(sweep_plots, "save_png", lambda fig, path, **kwargs: fig)
  means = {"fused": {1: {"accuracy_drop_mean_ablation": 0.02, "js_divergence": 0.5},
                     2: {"accuracy_drop_mean_ablation": 0.01, "js_divergence": 0.4}}}
  drops = sweep_plots.plot_analyses(means, None).axes[0]  # a sweep run with --analyze=mean
  assert [line.get_label() for line in drops.get_lines()] == ["fused, mean-ablated"]
  np.testing.assert_allclose(drops.get_lines()[0].get_ydata(), [2.0, 1.0])
  assert "(points)" in drops.get_ylabel()
