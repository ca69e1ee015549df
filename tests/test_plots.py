"""`dvc plots show` / `diff` of the real dvc.yaml on the committed results, in a temporary repo:
every declared plot renders with our `.dvc/plots/` templates (Vega-Lite compiled and drawn
by vl-convert, no browser), `dvc plots diff` tells revisions apart, and the offline page of
scripts/plots_html.py draws every plot in headless Chromium (skipped where there is none)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import vl_convert

from mergeloom import setups
from scripts import plots_html
from stages import common

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ["dvc.yaml", "params.yaml", ".dvc/plots"]  # as in the working tree
RESULTS = ["plots/sweep", "plots/analysis", "plots/report"]  # as committed (git archive HEAD)


def run(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def dvc(repo: Path, *args: str) -> str:
    return run(repo, sys.executable, "-m", "dvc", *args)


def training_logs(repo: Path, params: dict) -> None:
    """dvclive's TSVs for pretraining and every expert (the real ones are cached outputs,
    not in git): a short falling loss and rising accuracy."""
    folders = {"logs/pretrain/plots/metrics/pretrain": ("loss", "lr")}
    for name, unit in setups.units(params["setups"]).items():
        for task in unit.tasks:
            metrics = ("accuracy", "loss", "lr")
            folders[f"logs/finetune/{name}/{task}/plots/metrics/finetune"] = metrics
    for folder, metrics in folders.items():
        (repo / folder).mkdir(parents=True)
        for metric in metrics:
            rows = "".join(f"{s}\t{1 / (s + 1):.4f}\n" for s in range(5))
            (repo / folder / f"{metric}.tsv").write_text(f"step\t{metric}\n{rows}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The working tree's dvc.yaml, params and templates, the committed plot files and training
    logs, committed as `base`; then every sweep's test accuracy lowered by 0.1 in the workspace."""
    repo = tmp_path_factory.mktemp("plots")
    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    for name in PIPELINE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name)
        else:
            shutil.copy(source, repo / name)
    archive = subprocess.run(["git", "archive", "HEAD", *RESULTS], cwd=ROOT, check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(repo)], input=archive, check=True)
    training_logs(repo, common.read_params(repo / "params.yaml"))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "results")
    run(repo, "git", "tag", "base")
    for sweep in (repo / "plots/sweep").glob("*.csv"):
        lines = sweep.read_text().splitlines()
        rows = [line.rsplit(",", 1) for line in lines[1:]]
        sweep.write_text("\n".join([lines[0], *(f"{a},{float(b) - 0.1:.6f}" for a, b in rows)]))
    return repo


@pytest.fixture(scope="module")
def shown(repo) -> dict:
    return json.loads(dvc(repo, "plots", "show", "--json"))


def declared_plots(repo: Path) -> int:
    """How many plots dvc.yaml declares over the files present: one per file of every stage's
    plot output (DVC draws a folder file by file)."""
    params = common.read_params(repo / "params.yaml")
    count = len(params["merge"]["methods"])  # the sweep per method
    count += 8 * len(params["setups"])  # per setup: 4 CSVs and their 4 figures
    count += len(list((repo / "plots/report").iterdir()))
    count += len(list((repo / "logs").rglob("*.tsv")))
    return count


def axis_titles(node: object, axis: str) -> set[str]:
    """The titles of every ``axis`` encoding in a (layered, faceted) Vega-Lite spec."""
    if isinstance(node, list):
        return set().union(*(axis_titles(n, axis) for n in node))
    if not isinstance(node, dict):
        return set()
    found = {node["encoding"][axis]["title"]} if axis in node.get("encoding", {}) else set()
    return found.union(*(axis_titles(v, axis) for k, v in node.items() if k != "data"))


def test_every_declared_plot_is_shown_without_errors(repo, shown):
    assert "errors" not in shown, shown.get("errors")
    assert len(shown["data"]) == declared_plots(repo)
    assert all(renders for renders in shown["data"].values()), "a plot with nothing to show"


def test_every_vega_plot_compiles_and_draws_data(shown):
    """Each filled spec, drawn to SVG by Vega itself (vl-convert): a data mark with a path or a
    text, the check the browser test makes on the page."""
    checked = 0
    for name, renders in shown["data"].items():
        for render in renders:
            if render["type"] != "vega":
                continue
            spec = render["content"]
            assert "<DVC_METRIC" not in json.dumps(spec), f"{name}: an anchor left unfilled"
            svg = vl_convert.vegalite_to_svg(spec, vl_version=plots_html.VEGA_LITE)
            source = "vegaEmbed('#p', spec)"
            dom = f'<div id="p">{svg}</div>'
            assert plots_html.problems(source, dom) == [], f"{name} drew no data"
            checked += 1
    assert checked > 50


def test_the_lambda_sweep_is_per_method_against_lambda_with_a_panel_per_unit(shown):
    (render,) = shown["data"]["plots/sweep/ties.csv"]
    spec = render["content"]
    assert spec["title"]["text"] == "ties: test accuracy vs lambda"
    assert spec["facet"]["column"]["field"] == "unit"
    line, headline = spec["spec"]["layer"]
    assert spec["spec"]["encoding"]["x"]["scale"]["type"] == "log"
    assert spec["spec"]["encoding"]["x"]["title"] == "lambda (log scale)"
    assert line["encoding"]["color"]["field"] == "set"
    rows = spec["data"]["values"]
    assert {r["unit"] for r in rows} == {"multitask", "continual", "continual_sequential",
                                         "domains"}  # fmt: skip
    # the headline: continual reads its 10-way set `all`, the others the mean over their sets
    assert headline["transform"][2] == {"filter": "datum.has_all === 0 || datum.set === 'all'"}


@pytest.mark.parametrize("name", ["layers", "spectra", "redundancy"])
def test_analysis_templates_fold_every_column_of_their_csv_into_a_coloured_series(shown, name):
    """Each analysis CSV holds one column per (kind of task vectors, variant): its template
    lists them all (drift from stages/analyze.py fails here), colours by kind, names axes."""
    for setup in ("multitask", "continual"):
        (render,) = shown["data"][f"plots/analysis/{setup}/{name}.csv"]
        spec = render["content"]
        columns = set(spec["data"]["values"][0]) - {"rev", "filename", "field", "step"}
        x = spec["transform"][3]["calculate"].split("'")[1]
        assert columns - {x, "layer"} <= set(spec["transform"][0]["fold"])
        assert spec["spec"]["encoding"]["color"]["field"] == "series"
        assert spec["spec"]["encoding"]["strokeDash"]["field"] == "rev"
    vega = [r[0]["content"] for r in shown["data"].values() if r[0]["type"] == "vega"]
    assert all("y" not in axis_titles(spec, "y") for spec in vega)


def test_training_curves_are_drawn_per_expert_against_the_step(shown):
    name = "logs/finetune/multitask/digits/plots/metrics/finetune/loss.tsv"
    (render,) = shown["data"][name]
    assert render["content"]["title"]["text"] == "fine-tune multitask/digits"
    assert axis_titles(render["content"], "x") == {"step"}
    assert axis_titles(render["content"], "y") == {"loss"}


def test_report_and_analysis_figures_are_image_plots(shown):
    images = [n for n, r in shown["data"].items() if r[0]["type"] == "image"]
    assert "plots/report/ranking.png" in images
    assert "plots/analysis/continual/cosine.png" in images


def test_plots_diff_draws_base_and_workspace_told_apart_by_dashes(repo):
    data = json.loads(dvc(repo, "plots", "diff", "base", "--json"))["data"]
    (render,) = data["plots/sweep/ties.csv"]
    spec = render["content"]
    assert spec["spec"]["encoding"]["strokeDash"]["field"] == "rev"
    revs = {r["rev"] for r in spec["data"]["values"]}
    assert revs == {"base", "workspace"}
    by_rev = {rev: [float(r["test"]) for r in spec["data"]["values"] if r["rev"] == rev]
              for rev in revs}  # fmt: skip
    assert by_rev["workspace"] == pytest.approx([a - 0.1 for a in by_rev["base"]], abs=1e-5)


def test_the_offline_template_inlines_the_libraries_and_keeps_dvcs_placeholders(tmp_path):
    text = plots_html.write_template(tmp_path).read_text()
    assert "{plot_divs}" in text and "{refresh_tag}" in text
    assert "{scripts}" not in text  # DVC's CDN script tags have no place to go
    assert "cdn.jsdelivr" not in text and "<script src" not in text
    assert "window.vegaEmbed" in text and len(text) > 500_000
    with pytest.raises(ValueError, match="contains '</script'"):
        plots_html.html_template("let s = '</script>';", "v")


@pytest.mark.parametrize(
    ("dom", "problem"),
    [
        ('<div id="p"><svg><g class="mark-line role-mark"><path d="M1,2L3,4"></path></g>'
         "</svg></div>", None),
        ('<div id="p"><svg><g class="mark-line role-mark"></g><path d="M0,0"></path></svg>'
         "</div>", "plot p: no data mark drawn"),
        ('<div id="p"><pre class="plot-error">This plot failed to render: Error: bad</pre></div>',
         "plot p: This plot failed to render: Error: bad"),
        ('<div id="p"><pre class="plot-missing">p: no data</pre></div>',
         "plot p: no data (a cached output not in the workspace?)"),
        ("<div id=\"q\"></div>", "plot p: its div is missing from the page"),
        ('<div id="p"><svg><g class="mark-text role-mark"><text>0.5</text></g></svg></div>'
         '<img src="static/a.png" data-loaded="no">', "image static/a.png: did not load"),
    ],
)  # fmt: skip
def test_the_page_check_names_what_did_not_draw(dom, problem):
    found = plots_html.problems("<script>vegaEmbed('#p', spec);</script>", dom)
    assert found == ([problem] if problem else [])


@pytest.mark.skipif(not plots_html.CHROMIUM.exists(), reason=f"no Chromium at "
                    f"{plots_html.CHROMIUM} (.ci/run installs Debian's chromium)")  # fmt: skip
def test_the_offline_page_draws_every_plot_in_headless_chromium(repo, shown):
    """The check `make plots` runs, on the page of every declared plot; DVC's own page (Vega from
    a CDN) draws nothing here, where there is no network: the check can fail."""
    template = plots_html.write_template(repo / ".dvc/tmp")
    page = plots_html.render([], repo / "offline", template, repo=repo)
    source = page.read_text()
    images = plots_html.without_scripts(source).count("<img ")
    assert len(plots_html.plot_ids(source)) + images == len(shown["data"])
    assert plots_html.problems(source, plots_html.browser_dom(page)) == []
    dvc(repo, "plots", "show", "plots/sweep/ties.csv", "-o", "cdn")
    cdn = repo / "cdn" / "index.html"
    assert plots_html.problems(cdn.read_text(), plots_html.browser_dom(cdn)) == [
        "plot plots_sweep_ties_csv: no data mark drawn"
    ]


@pytest.mark.skipif(not plots_html.CHROMIUM.exists(), reason=f"no Chromium at "
                    f"{plots_html.CHROMIUM} (.ci/run installs Debian's chromium)")  # fmt: skip
def test_the_page_says_which_plot_failed_or_had_no_data(tmp_path):
    """DVC writes an empty spec for a declared plot whose files are missing (training logs not
    pulled) and Vega rejects a bad spec: the page says so in place of a blank."""
    good = {"data": {"values": [{"a": 1, "b": 2}, {"a": 2, "b": 1}]}, "mark": "line",
            "encoding": {"x": {"field": "a", "type": "quantitative"},
                         "y": {"field": "b", "type": "quantitative"}}}  # fmt: skip
    specs = {"good": good, "empty": {}, "bad": {**good, "mark": "no-such-mark"}}
    divs = "".join(f"<div id=\"{name}\"><script>vegaEmbed('#{name}', {json.dumps(spec)});"
                   "</script></div>" for name, spec in specs.items())  # fmt: skip
    page = tmp_path / "index.html"
    page.write_text(plots_html.write_template(tmp_path).read_text().replace("{plot_divs}", divs))
    found = plots_html.problems(page.read_text(), plots_html.browser_dom(page))
    assert len(found) == 2, found
    assert found[0] == "plot empty: no data (a cached output not in the workspace?)"
    assert found[1].startswith("plot bad: This plot failed to render: "), found
