"""reports/summary.md: table layout, the privileged marks, lambda-curve marks and figures."""

import pytest

from stages import report_md
from stages.report import unit_table


def acc(test, val=0.0):
    return {"test": test, "val": val}


def unit_metrics() -> dict:
    curves = {"0.5": {"a": acc(0.3, 0.4), "b": acc(0.5, 0.2)},
              "1": {"a": acc(0.7, 0.6), "b": acc(0.3, 0.5)}}  # fmt: skip
    return {
        "baselines": {"zeroshot": {"a": acc(0.2), "b": acc(0.4)},
                      "experts": {"a": {"a": acc(0.8), "b": acc(0.1)},
                                  "b": {"a": acc(0.1), "b": acc(0.5)}}},
        "merge": {"all": {"ties": {"a": acc(0.4), "b": acc(0.5)},
                          "weight_averaging": {"a": acc(0.35), "b": acc(0.45)}}},
        "sweep": {"all": {"ties": {"curves": curves, "oracle_lam": 1.0, "oracle": curves["1"],
                                   "best_lambdas": {"a": 1.0, "b": 0.5}},
                          "weight_averaging": {"curves": curves, "oracle_lam": 0.5,
                                               "oracle": curves["0.5"],
                                               "best_lambdas": {"a": 1.0, "b": 1.0}}}},
        "weave": {"all": {"ties": {"mean": {"scores": {"a": acc(0.5), "b": acc(0.3)}},
                                   "random": {"scores": {"a": acc(0.6), "b": acc(0.2)}}}}},
    }  # fmt: skip


def test_table_rows_follow_the_paper_layout_and_mark_the_oracle():
    table = report_md.results_table(unit_table(unit_metrics()))
    lines = table.splitlines()
    assert lines[0] == "|  | a | b | avg abs. | avg norm. |"
    labels = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    oracle = f"@ oracle lambda {report_md.DAGGER}"
    assert labels == ["zero-shot", "individual experts", "ties", "ties + weave (mean)",
                      "ties + weave (random)", f"ties {oracle}", "weight_averaging",
                      f"weight_averaging {oracle}"]  # fmt: skip
    assert "| ties | 40.0 | 50.0 | 45.0 | 75.0 |" in lines  # normalised: (0.4/0.8 + 0.5/0.5)/2


def test_lambda_panels_mark_default_oracle_and_weave():
    panels = report_md.lambda_panels(unit_metrics(), {"ties": 1.0}, ["a", "b"])
    ties = panels["ties"]
    assert ties["tasks"]["a"] == ([0.5, 1.0], [0.3, 0.7])
    assert ties["average"][1] == pytest.approx([0.4, 0.5])
    assert ties["default"] == (1.0, pytest.approx(0.45))  # merge.json at params' lambda
    assert ties["oracle"] == (1.0, pytest.approx(0.5))
    assert ties["weave"] == {"mean": pytest.approx(0.4), "random": pytest.approx(0.4)}
    assert "default" not in panels["weight_averaging"]  # no lambda in params: no star
    assert panels["weight_averaging"]["weave"] == {}


def test_document_embeds_tables_figures_and_the_correlation_summary(tmp_path):
    metrics = unit_metrics()
    details = {"multitask": unit_table(metrics)}
    names = report_md.write_figures(details, {"multitask": metrics}, {"ties": 1.0},
                                    tmp_path / "figures", tmp_path)  # fmt: skip
    for name in ("lambda_multitask", "optimal_lambdas", "ranking"):
        assert (tmp_path / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    analyses = {"continual": {
        "individual": {"correlation": {"cosine_mean_off_diagonal": 0.03}},
        "sequential": {"correlation": {"cosine_mean_off_diagonal": 0.67}}}}  # fmt: skip
    names["analysis"] = {"continual": "../plots/analysis/continual/cosine.png"}
    text = report_md.document(details, analyses, names)
    assert "![accuracy vs lambda, multitask](figures/lambda_multitask.png)" in text
    assert "| continual | sequential | 0.670 |" in text
    assert "![cosine, continual](../plots/analysis/continual/cosine.png)" in text
    report_md.write_text(tmp_path / "summary.md", text)
    assert (tmp_path / "summary.md").read_text() == text
