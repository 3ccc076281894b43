"""The results docs are generated from the result files (benchmarks/report.py): regenerating
them changes nothing, so no number in them can drift from its file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("results_report", ROOT / "benchmarks" /
                                                  "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_report"] = module
    spec.loader.exec_module(module)
    return module


def test_the_results_docs_are_what_the_result_files_give() -> None:
    report = _report()
    for path, text in ((report.INDEX, report.index_md()), (report.DOCS, report.results_md()),
                       (report.README, report.readme_md())):
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} differs from the results: run python benchmarks/report.py")


def test_every_result_directory_has_a_readme_with_its_question_and_answer() -> None:
    report = _report()
    names = {d.name for d in report.directories()}
    assert names >= {"default-job", "tuned-comparison-synthetic", "step-time"}
    for d in report.directories():
        h = report.header(d)
        assert h["question"].strip() and h["answer"].strip(), d
    assert not list(report.RESULTS.rglob("*.py")), "no script lives inside a result directory"
    # every directory below a question has one too: its studies, and the raw output of each
    # command (saying what it holds and pointing up to the question's README)
    below = [p for d in report.directories() for p in d.rglob("*") if p.is_dir()]
    assert [p for p in below if not (p / "README.md").is_file()] == []


def test_the_readme_table_is_a_section_of_the_results_doc() -> None:
    report = _report()
    assert report.glance() in report.results_md()
    assert f"{report.BEGIN}\n{report.glance()}\n{report.END}" in report.readme_md()


def test_the_gate_table_is_what_the_gate_runs_give() -> None:
    spec = importlib.util.spec_from_file_location("gate_table", ROOT / "benchmarks" /
                                                  "gate_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.README.read_text() == module.readme(), (
        "benchmarks/results/novelty-routing/README.md's gate table differs from the run "
        "files: run python benchmarks/gate_table.py")
    assert "| gate 0.01, nothing replayed |" in module.table()
