"""reports/summary.md and metrics/headline.json: table layout, the privileged and best marks,
like-with-like averages, coinciding rows, lambda-curve marks, figures, and which file DVC shows."""

import re
from pathlib import Path

import pytest
import yaml

from mergeloom import setups
from stages import common, pipeline, report_md
from stages.report import MAX_HEADLINE_VALUES, headline, unit_table

ROOT = Path(__file__).resolve().parent.parent


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
    # normalised: (0.4/0.8 + 0.5/0.5)/2; bold: the best data-free merged row of the column
    assert "| ties | 40.0 | **50.0** | **45.0** | **75.0** |" in lines
    assert "| ties + weave (random) | **60.0** | 20.0 | 40.0 | 57.5 |" in lines
    assert f"| ties @ oracle lambda {report_md.DAGGER} | 70.0 | 30.0 | 50.0 | 73.8 |" in lines
    assert "| individual experts | 80.0 | 50.0 | 65.0 | 100.0 |" in lines  # never bold


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
    assert text.index("## Headline") < text.index("## multitask")  # the answer first


def continual_metrics() -> dict:
    """Two splits merged once; `all` (the 10-way set) is primary and has no expert."""
    scores = lambda a, s0, s1: {"all": acc(a), "s0": acc(s0), "s1": acc(s1)}  # noqa: E731
    curves = {"1": scores(0.6, 0.7, 0.5)}
    return {
        "baselines": {"zeroshot": scores(0.3, 0.2, 0.4),
                      "experts": {"s0": scores(0.5, 0.9, 0.1), "s1": scores(0.4, 0.2, 0.8)}},
        "merge": {"all": {"ties": scores(0.6, 0.7, 0.5)}},
        "sweep": {"all": {"ties": {"curves": curves, "oracle_lam": 1.0, "oracle": curves["1"],
                                   "best_lambdas": {"s0": 1.0, "s1": 1.0}}}},
        "weave": {"all": {"ties": {"max_abs": {"scores": scores(0.6, 0.7, 0.5)}}}},
    }  # fmt: skip


def test_every_row_averages_the_same_sets_and_the_caption_says_which():
    table = unit_table(continual_metrics())
    experts = table["rows"]["individual experts"]
    # on `all` the experts' mean (0.5 + 0.4) / 2, not the mean of their own splits (0.85)
    assert experts["per_set"] == {"all": pytest.approx(0.45), "s0": 0.9, "s1": 0.8}
    assert experts["absolute"] == pytest.approx(0.45) and experts["normalized"] == 1.0
    assert table["rows"]["ties"]["absolute"] == pytest.approx(0.6)  # `all`, like every row
    assert table["rows"]["ties"]["normalized"] == pytest.approx((0.7 / 0.9 + 0.5 / 0.8) / 2)
    assert (table["primary"], table["normalized_over"]) == (["all"], ["s0", "s1"])
    assert report_md.averaged_sets(table) == (
        "abs. over all; norm. over s0, s1 (the sets with an expert of their own); individual "
        "experts on all: the mean of the 2 experts, each scored on it"
    )
    assert report_md.averaged_sets(unit_table(unit_metrics())) == "both averages over a, b"


def test_coinciding_rows_are_found_and_explained_from_the_numbers():
    table = unit_table(continual_metrics())  # default, weave max_abs and oracle: one model
    (group,) = table["identical"]
    assert group == {"rows": ["ties", "ties + weave (max_abs)", "ties @ oracle lambda"],
                     "equal_to": [["ties", 1.0]]}  # fmt: skip
    note = report_md.identical_note(group)
    assert note.startswith("`ties`, `ties + weave (max_abs)`, `ties @ oracle lambda`: the same")
    assert "equal to `ties` at lambda 1 on the sweep" in note
    assert "MagMax" not in note and "oracle picked" not in note  # no rule fits all three
    pools = {"rows": ["ties + weave (max_abs)", "pcb + weave (max_abs)"],
             "equal_to": [["magmax", 1.0]]}  # fmt: skip
    assert "the pool is MagMax of the task vectors" in report_md.identical_note(pools)
    oracle = {"rows": ["random_mix", "random_mix @ oracle lambda"], "equal_to": []}
    assert report_md.identical_note(oracle).endswith("(the oracle picked the default's lambda).")
    scaled = {"rows": ["weight_averaging @ oracle lambda", "task_arithmetic @ oracle lambda"],
              "equal_to": [["weight_averaging", 0.5], ["task_arithmetic", 0.1]]}  # fmt: skip
    assert "(the mean of 5 task vectors scaled by 0.5 is their sum scaled by 0.1)" in (
        report_md.identical_note(scaled)
    )
    assert unit_table(unit_metrics())["identical"] == []
    notes = report_md.identical_notes({"u1": table, "u2": table})
    assert len(notes) == 1 and notes[0].startswith("- u1, u2: `ties`")


def test_headline_table_puts_units_side_by_side_and_bolds_the_best_data_free_row():
    details = {"multitask": unit_table(unit_metrics()),
               "continual": unit_table(continual_metrics())}  # fmt: skip
    lines = report_md.headline_table(details).splitlines()
    assert lines[0] == ("|  | multitask abs. | multitask norm. | continual abs. | "
                        "continual norm. |")  # fmt: skip
    assert "| ties | **45.0** | **75.0** | **60.0** | **70.1** |" in lines
    # the oracle scores higher on multitask but is privileged: not bold
    assert f"| ties @ oracle lambda {report_md.DAGGER} | 50.0 | 73.8 | 60.0 | 70.1 |" in lines
    assert "| weight_averaging | 40.0 | 66.9 | - | - |" in lines  # absent from a unit


def embedded_details() -> dict:
    """Details shaped like the embedded default's: every unit, method and pool of
    params.yaml, each row at a made-up accuracy."""
    params = common.read_params(ROOT / "params.yaml")
    pools, woven = params["weave"]["pools"], params["weave"]["methods"]
    row = {"absolute": 0.5, "normalized": 0.6, "privileged": False, "per_set": {}}
    names = ["zero-shot", "individual experts"]
    for method in params["merge"]["methods"]:
        names += [method, f"{method} @ oracle lambda"]
        names += [f"{method} + weave ({p})" for p in pools] if method in woven else []
    return {unit: {"rows": dict.fromkeys(names, row),
                   "lambda_dispersion": dict.fromkeys(params["merge"]["methods"])}
            for unit in setups.units(params["setups"])}  # fmt: skip


def leaves(node: dict, path: tuple = ()) -> list[tuple]:
    return [
        leaf
        for k, v in node.items()
        for leaf in (leaves(v, (*path, k)) if isinstance(v, dict) else [(*path, k)])
    ]


def test_headline_of_the_embedded_default_fits_dvc_exp_show():
    details = embedded_details()
    values = headline(details, ["mean", "random", "max_abs"])
    keys = leaves(values)
    assert len(details) == 4 and len(keys) == 112 <= MAX_HEADLINE_VALUES  # 4 x (13 + 12 + 3)
    assert all(re.fullmatch(r"[a-z0-9_]+", part) for key in keys for part in key), keys
    assert values["multitask"]["ties"] == {"default": 0.5, "weave_mean": 0.5}
    assert values["multitask"]["weight_averaging"] == {"default": 0.5}  # never woven
    assert values["multitask"]["zero_shot"] == {"absolute": 0.5, "normalized": 0.6}
    assert values["multitask"]["individual_experts"] == {"absolute": 0.5}
    assert "weave_random" in headline(details, ["random"])["domains"]["ties"]
    details["domains"]["rows"]["zero-shot"]["normalized"] = None  # no set with its own expert
    assert headline(details, ["mean"])["domains"]["zero_shot"] == {"absolute": 0.5}


def test_only_the_headline_is_a_dvc_metric_and_the_details_keep_the_run_cache():
    """DVC 3.67 run-caches a stage only if every output is cached or a metric/plot: the
    details are cached outputs (git-ignored; `dvc pull` or `make repro` brings them)."""
    stages = yaml.safe_load(pipeline.render(ROOT).split("\n", 2)[2])["stages"]
    declared = {kind: [next(iter(o)) if isinstance(o, dict) else o
                       for s in stages.values() for o in s.get("do", s).get(kind, [])]
                for kind in ("metrics", "outs")}  # fmt: skip
    assert declared["metrics"] == ["metrics/headline.json"]
    details = ["metrics/baselines.json", "metrics/merge/${key}.json",
               "metrics/weave/${item}.json", "metrics/analysis/${key}.json",
               "metrics/summary.json"]  # fmt: skip
    assert all(d in declared["outs"] for d in details)  # plain strings: cached
