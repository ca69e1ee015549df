"""Evaluation protocols, oracle selection, dispersion and the report table, on hand-made data."""

import pytest
import torch

from mergeloom import protocol
from mergeloom.tasks import Task, TensorImages, labels_of
from stages.report import unit_table


def task(name, labels):
    labels = torch.tensor(labels)
    split = TensorImages(torch.rand(len(labels), 3, 8, 8), labels)
    return Task(name, ("a", "b", "c"), ("{}",), split, split, split)


def test_multitask_merges_everything_and_scores_each_task_with_its_head():
    tasks = [task("t1", [0, 1]), task("t2", [1, 2])]
    heads = {"t1": torch.ones(4, 3), "t2": torch.zeros(4, 3)}
    (problem,) = protocol.multitask_problems(tasks, heads)
    assert problem.members == ("t1", "t2") and problem.primary == ("t1", "t2")
    assert [s.name for s in problem.eval_sets] == ["t1", "t2"]
    assert problem.eval_sets[1].head is heads["t2"]


def test_continual_scores_the_full_set_and_each_split_subset():
    all_digits = task("all_digits", [0, 1, 2, 2, 1])
    (problem,) = protocol.continual_problems(
        {"s0": [0, 2], "s1": [1]}, all_digits, torch.ones(4, 3)
    )
    assert problem.members == ("s0", "s1") and problem.primary == ("all",)
    by_name = {s.name: s for s in problem.eval_sets}
    assert by_name["all"].test is all_digits.test
    assert labels_of(by_name["s0"].test).tolist() == [0, 2, 2]  # 10-way labels: task-agnostic
    assert labels_of(by_name["s1"].val).tolist() == [1, 1]
    images = all_digits.test.images
    assert torch.equal(by_name["s0"].test[1][0], images[2])  # the same images, by index
    assert [by_name["s1"].test[i][1] for i in range(2)] == [1, 1]


def test_domains_leave_one_out():
    tasks = [task(d, [0]) for d in ("a", "b", "c")]
    problems = protocol.domain_problems(tasks, {d: torch.ones(4, 3) for d in "abc"})
    assert [(p.name, p.members) for p in problems] == [
        ("a", ("b", "c")),
        ("b", ("a", "c")),
        ("c", ("a", "b")),
    ]
    with pytest.raises(ValueError, match="at least 2 domains, got 1"):
        protocol.domain_problems(tasks[:1], {"a": torch.ones(4, 3)})


def test_oracle_uses_the_mean_over_primary_sets_and_prefers_the_smaller_lambda():
    val = {"0.5": {"x": 0.8, "y": 0.4, "diag": 0.0}, "1": {"x": 0.4, "y": 0.8, "diag": 1.0},
           "2": {"x": 0.9, "y": 0.2, "diag": 0.0}}  # fmt: skip
    assert protocol.oracle(val, ["x", "y"]) == "0.5"  # 0.6 ties with lam 1; smaller wins
    assert protocol.oracle(val, ["x"]) == "2"
    assert protocol.best_lambdas(val) == {"x": 2.0, "y": 1.0, "diag": 1.0}


def test_dispersion_and_normalized():
    d = protocol.dispersion([0.1, 0.2, 0.3, 0.4, 1.0])
    assert (d["min"], d["max"], d["median"]) == (0.1, 1.0, 0.3)
    assert d["q1"] == pytest.approx(0.2) and d["q3"] == pytest.approx(0.4)
    assert d["iqr"] == pytest.approx(0.2)
    assert protocol.dispersion([0.7])["iqr"] == 0
    assert protocol.normalized({"a": 0.5, "b": 0.3}, {"a": 1.0, "b": 0.0}) == {"a": 0.5}


def acc(test, val=0.0):
    return {"test": test, "val": val}


def test_report_rows_absolute_normalized_and_privileged_oracle():
    metrics = {
        "baselines": {"zeroshot": {"a": acc(0.2), "b": acc(0.4)},
                      "experts": {"a": {"a": acc(0.8), "b": acc(0.1)},
                                  "b": {"a": acc(0.1), "b": acc(0.5)}}},
        "merge": {"all": {"ties": {"a": acc(0.4), "b": acc(0.5)}}},
        "sweep": {"all": {"ties": {"oracle": {"a": acc(0.6), "b": acc(0.5)},
                                   "best_lambdas": {"a": 0.3, "b": 1.0}}}},
        "weave": {"all": {"ties": {"mean": {"scores": {"a": {"test": 0.5}, "b": {"test": 0.3}},
                                            "effective_lam": 0.4}}}},
    }  # fmt: skip
    table = unit_table(metrics)
    rows = table["rows"]
    assert rows["individual experts"]["per_set"] == {"a": 0.8, "b": 0.5}
    assert rows["zero-shot"]["absolute"] == pytest.approx(0.3)
    assert rows["ties"]["absolute"] == pytest.approx(0.45)
    assert rows["ties"]["normalized"] == pytest.approx((0.4 / 0.8 + 0.5 / 0.5) / 2)
    assert rows["ties + weave (mean)"]["absolute"] == pytest.approx(0.4)
    assert rows["ties @ oracle lambda"]["privileged"] is True
    assert rows["ties"]["privileged"] is False
    assert table["lambda_dispersion"]["ties"]["max"] == 1.0
