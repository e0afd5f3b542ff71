"""Report and figures: drawn from report.json and the workdir's files alone; clear errors."""

import json
import os

import numpy as np
import pytest

from cafd_jax import figures, report


def _rows():
  rows = [{"attack": "none", "defense": d, "threat_model": "unseen", "model": "vgg_tiny",
           "eps": 0.0, "accuracy": a, "n": 100} for d, a in (("none", 0.9), ("cafd", 0.85))]
  for eps, (bare, unseen, white) in {2 / 255: (0.5, 0.8, 0.6), 8 / 255: (0.1, 0.7, 0.2)}.items():
    rows += [
        {"attack": "pgd", "defense": "none", "threat_model": "unseen", "model": "vgg_tiny",
         "eps": eps, "accuracy": bare, "n": 100},
        {"attack": "pgd", "defense": "cafd", "threat_model": "unseen", "model": "vgg_tiny",
         "eps": eps, "accuracy": unseen, "n": 100},
        {"attack": "pgd", "defense": "cafd", "threat_model": "white_box", "model": "vgg_tiny",
         "eps": eps, "accuracy": white, "n": 100}]
  return rows


def _cam_arrays(panels=3, count=4, size=8):
  rng = np.random.default_rng(0)
  return {"images": rng.random((panels, count, size, size, 3)),
          "cams": rng.random((panels, count, size, size)),
          "titles": np.asarray(["natural", "adversarial (pgd)", "cafd(adversarial)"]),
          "predicted": np.asarray([["cat"] * count] * panels),
          "labels": np.asarray(["cat", "dog", "cat", "ship"])}


def _write_scalars(log_dir):
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  for stage, scale in (("train_classifier", 2.0), ("train_denoiser", 10.0)):
    writer = SummaryWriter(os.path.join(log_dir, stage))
    for step in range(1, 6):
      writer.add_scalar(f"{stage}/loss", scale / step, step)
    writer.close()


def _png(path):
  with open(path, "rb") as file:
    return file.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


def test_eps_curves_group_by_defense_threat_model_and_model():
  curves = figures.eps_curves(_rows())
  assert set(curves) == {"pgd"}
  assert curves["pgd"][("cafd", "white_box", "vgg_tiny")] == [(2 / 255, 0.6), (8 / 255, 0.2)]
  single = [row for row in _rows() if row["eps"] in (0.0, 8 / 255)]
  assert figures.eps_curves(single) == {}  # one budget per attack: nothing to draw


def test_scalars_read_back_from_tensorboard_event_files(tmp_path):
  _write_scalars(str(tmp_path))
  scalars = figures.read_scalars(str(tmp_path))
  assert scalars["train_classifier/loss"] == [(s, pytest.approx(2.0 / s)) for s in range(1, 6)]
  assert scalars["train_denoiser/loss"][-1] == (5, pytest.approx(2.0))


def test_write_renders_table_integrity_and_every_figure(tmp_path):
  workdir = str(tmp_path)
  _write_scalars(os.path.join(workdir, "tensorboard"))
  os.makedirs(tmp_path / "figures")
  np.savez(tmp_path / "figures" / figures.CAM_ARRAYS, **_cam_arrays())
  report.write(workdir, {"seed": 0}, _rows())
  for name in (figures.ACCURACY_VS_EPS, figures.CAM_GRID, figures.TRAINING_CURVES):
    assert _png(tmp_path / "figures" / name), name
  markdown = (tmp_path / "report.md").read_text()
  assert "| pgd | 8/255 | white_box | - | 0.2000 |" in markdown
  assert f"![{figures.CAM_GRID}](figures/{figures.CAM_GRID})" in markdown
  assert json.loads((tmp_path / "report.json").read_text())["integrity"]


def test_render_rebuilds_the_same_outputs_from_report_json_alone(tmp_path):
  workdir = str(tmp_path)
  np.savez(os.path.join(workdir, "arrays.npz"))  # unrelated files are ignored
  os.makedirs(tmp_path / "figures")
  np.savez(tmp_path / "figures" / figures.CAM_ARRAYS, **_cam_arrays())
  report.write(workdir, {"seed": 0}, _rows())
  markdown = (tmp_path / "report.md").read_text()
  for name in ("report.md", f"figures/{figures.ACCURACY_VS_EPS}", f"figures/{figures.CAM_GRID}"):
    os.remove(tmp_path / name)
  report.render(workdir)
  assert (tmp_path / "report.md").read_text() == markdown
  assert _png(tmp_path / "figures" / figures.ACCURACY_VS_EPS)
  assert _png(tmp_path / "figures" / figures.CAM_GRID)
  assert not (tmp_path / "figures" / figures.TRAINING_CURVES).exists()  # no logs, no curve


def test_model_column_appears_with_several_target_models():
  rows = _rows() + [dict(row, model="resnet18@other") for row in _rows()]
  table = report.markdown_table(rows)
  assert table.startswith("| model | attack | eps | threat model | none | cafd |")
  assert "| resnet18@other | pgd | 2/255 | unseen | 0.5000 | 0.8000 |" in table
  assert report.markdown_table(_rows()).startswith("| attack | eps |")


def test_missing_or_corrupt_report_json_is_one_clear_error(tmp_path):
  with pytest.raises(report.ReportError, match="run the evaluate stage first"):
    report.render(str(tmp_path))
  (tmp_path / "report.json").write_text("{not json")
  with pytest.raises(report.ReportError, match="rerun the evaluate stage"):
    report.render(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["report.json"]  # nothing half-written


def test_wilson_intervals_match_published_values_and_reach_the_table():
  # 50 of 100: the textbook Wilson interval (Agresti & Coull 1998) is [0.4038, 0.5962].
  assert report.wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
  low, high = report.wilson_interval(1.0, 2000)  # never beyond [0, 1], never zero-width
  assert high == 1.0 and 0.997 < low < 1.0
  rows = [{"attack": "pgd", "defense": "cafd", "threat_model": "unseen", "eps": 8 / 255,
           "accuracy": 0.5, "n": 2000}]
  assert "within ±2.2 points" in report.markdown_table(rows)


def test_find_row_takes_the_own_target_at_the_asked_eps():
  rows = [dict(row, model="resnet18@other", accuracy=0.0) for row in _rows()] + _rows()
  assert report.find_row(rows, "pgd", "cafd", "unseen")["accuracy"] == 0.8  # first eps, own model
  assert report.find_row(rows, "pgd", "cafd", "unseen", eps=8 / 255)["accuracy"] == 0.7
  assert report.find_row(rows, "pgd", "cafd", "bpda") is None
  assert report.percent_text({"accuracy": 0.5, "n": 100}) == "50.0 (40.4-59.6)"
  assert report.percent_text({"accuracy": 0.5, "n": 100}, interval=False) == "50.0"


def test_the_table_command_prints_intervals_and_fails_in_one_line(tmp_path, capsys):
  report.write(str(tmp_path), {}, _rows(), draw_figures=False)
  out_file = tmp_path / "table.md"
  report.main([str(tmp_path), "--out", str(out_file)])
  printed = capsys.readouterr().out
  assert "| pgd | 8/255 | white_box | - | 20.0 (13.3-28.9) |" in printed
  assert printed.strip() == out_file.read_text().strip()
  with pytest.raises(SystemExit, match=r"^error: .*run the evaluate stage first"):
    report.main([str(tmp_path / "missing")])
