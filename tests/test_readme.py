"""The README cannot drift from the code: its Python API snippet runs on a finished run, and CI
runs its test command verbatim."""

import re

import numpy as np

from conftest import ROOT

README = ROOT / "README.md"


def _section(title: str) -> str:
  text = README.read_text()
  assert f"\n## {title}\n" in text, f"README has no section {title!r}"
  return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str, language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", _section(section), re.S)


def test_the_python_api_snippet_runs_on_a_finished_run(finished_run):
  workdir, _ = finished_run
  (snippet,) = _blocks("Python API", "python")
  assert '"/tmp/cafd-quickstart"' in snippet  # the quickstart's workdir, replaced by the run's
  images = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
  namespace = {"images": images}
  exec(snippet.replace('"/tmp/cafd-quickstart"', repr(str(workdir))), namespace)  # pylint: disable=exec-used
  assert namespace["purified"].shape == images.shape
  assert np.all((np.asarray(namespace["purified"]) >= 0) & (np.asarray(namespace["purified"]) <= 1))
  assert namespace["logits"].shape == (3, 10)


def test_ci_runs_the_readme_test_command():
  (commands,) = _blocks("Set-up: two commands", "bash")
  lines = [line for line in commands.splitlines() if line and not line.startswith("#")]
  assert len(lines) == 2, lines  # exactly two set-up commands
  assert lines[1] in (ROOT / ".ci" / "run").read_text()
