"""Render `dvc plots show` / `dvc plots diff` as HTML that draws with no network.

    python -m scripts.plots_html                    # make plots: dvc plots show -> dvc_plots/
    python -m scripts.plots_html main               # make plots-diff BASE=main: main vs workspace
    python -m scripts.plots_html --check [REV ...]  # then open the page in headless Chromium

DVC's own page loads Vega, Vega-Lite and vega-embed from a CDN, so offline it stays blank. Here
DVC renders through `--html-template` with a template that carries the three libraries inline,
bundled by vl-convert-python (pinned in requirements.lock; Vega-Lite 5, the major version of
DVC's and our `.dvc/plots/` templates). The page is then one self-contained file; image plots
are files beside it, as DVC writes them. The template is written once per bundle version to
`.dvc/tmp/` (git-ignored). Its `vegaEmbed` draws SVG (so a DOM dump shows every mark) and
writes a failed plot's error into the page instead of leaving a blank; the results lead the
page, the per-expert training curves follow them.

`--check` opens the page in headless Chromium (Debian's /usr/bin/chromium) and fails unless
every Vega plot drew marks and every image loaded; tests/test_plots.py runs the same check.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stages import common

VEGA_LITE = "5.21"  # the newest Vega-Lite 5 that vl-convert-python bundles
CHROMIUM = Path("/usr/bin/chromium")
# DVC fills these placeholders with str.replace; `scripts` (its CDN tags) is left out on purpose
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")
# DVC gives a declared plot whose files are missing (cached outputs not pulled) an empty spec
SNIPPET = """
window.vega = vega;
window.vegaLite = vegaLite;
const note = (el, kind, text) => {
  const pre = document.createElement("pre");
  pre.className = kind;
  pre.textContent = text;
  document.querySelector(el).appendChild(pre);
};
window.vegaEmbed = (el, spec, opts) => {
  if (!spec || Object.keys(spec).length === 0) {
    note(el, "plot-missing", el.slice(1) + ": no data in this revision (a cached output? " +
         "`dvc pull` or `make repro` brings it)");
    return Promise.resolve();
  }
  return vegaEmbed(el, spec, { renderer: "svg", ...opts }).catch((error) =>
    note(el, "plot-error", "This plot failed to render: " + error));
};
"""
# Results first: DVC orders plots as dvc.yaml lists stages, which puts the dvclive curves of
# every expert (ids from logs/...) above the sweeps; they move to the end. After load, each image
# says whether it decoded, for the DOM dump of --check.
PAGE_END = """<script>
for (const div of [...document.body.children]) {
  if (div.id && div.id.startsWith("logs_")) document.body.appendChild(div);
}
window.addEventListener("load", () => {
  for (const img of document.images) img.dataset.loaded = img.naturalWidth > 0 ? "yes" : "no";
});
</script>"""
PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<script>
// {versions}: inlined by scripts/plots_html.py, so the page needs no network
(function () {
{bundle}
})();
</script>
<style>
  body { font-family: sans-serif; }
  .plot-error { color: #b00020; white-space: pre-wrap; }
  .plot-missing { color: #666; white-space: pre-wrap; }
  img { max-width: 95vw; }  /* DVC's image plots: the report's wide figures fit the window */
</style>
</head>
<body>
{plot_divs}
{page_end}
</body>
</html>
"""


def versions() -> str:
    import vl_convert

    return (f"Vega {vl_convert.get_vega_version()}, Vega-Lite {VEGA_LITE}, "
            f"vega-embed {vl_convert.get_vega_embed_version()}")  # fmt: skip


def html_template(bundle: str, label: str) -> str:
    """DVC's page template with ``bundle`` (the three libraries) inlined in a script tag."""
    for bad in ("</script", *PLACEHOLDERS):
        if bad in bundle.lower():
            raise ValueError(f"the JavaScript bundle contains {bad!r}, which would break the "
                             "page; expected a bundle without it")  # fmt: skip
    fill = {"{versions}": label, "{bundle}": bundle, "{page_end}": PAGE_END}
    return re.sub("|".join(map(re.escape, fill)), lambda m: fill[m.group()], PAGE)


def write_template(folder: Path) -> Path:
    """The template for the installed vl-convert-python in ``folder``, written once (bundling
    takes seconds)."""
    import vl_convert

    label = versions()
    key = hashlib.sha256("\n".join((label, SNIPPET, PAGE, PAGE_END)).encode()).hexdigest()[:16]
    path = folder / f"plots_offline_{key}.html"  # a new name when a version or the page changes
    if not path.is_file():
        bundle = vl_convert.javascript_bundle(snippet=SNIPPET, vl_version=VEGA_LITE)
        common.write_text(path, html_template(bundle, label))
    return path


def render(revs: list[str], out: Path, template: Path, repo: Path | None = None) -> Path:
    """`dvc plots show` (no revs) or `dvc plots diff REVS` of ``repo`` (default: here) into
    ``out``/index.html."""
    command = ["diff", *revs] if revs else ["show"]
    dvc = [sys.executable, "-m", "dvc", "plots", *command, "-o", str(Path(out).resolve()),
           "--html-template", str(Path(template).resolve())]  # fmt: skip
    result = subprocess.run(dvc, cwd=repo, capture_output=True, text=True)
    page = Path(out) / "index.html"
    if result.returncode != 0 or not page.is_file():
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise ValueError(f"`dvc plots {' '.join(command)}` failed: {lines[-1]}")
    return page


def browser_dom(page: Path, chromium: Path = CHROMIUM, budget_ms: int = 60000) -> str:
    """The page's DOM after its scripts ran, from headless Chromium (flags that keep it off the
    network; a fresh profile each time)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        result = subprocess.run(
            [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", "--allow-file-access-from-files",
             f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    if result.returncode != 0 or "<body" not in result.stdout:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise ValueError(f"{chromium} could not open {page}: {lines[-1]}")
    return result.stdout


def without_scripts(html: str) -> str:
    return re.sub(r"<script\b.*?</script>", "", html, flags=re.DOTALL)


def plot_ids(source: str) -> list[str]:
    """The Vega plots of a DVC page: DVC writes one `vegaEmbed('#id', spec)` per plot."""
    return re.findall(r"vegaEmbed\('#([^']+)'", source)


def problems(source: str, dom: str) -> list[str]:
    """What did not draw, from the page's ``source`` (DVC writes one `vegaEmbed('#id', ...)` per
    Vega plot) and its rendered ``dom``: a plot with no data mark (a line, point, bar or text
    drawn inside a Vega `role-mark` group), a plot that wrote an error or had no data, an image
    that did not load. Empty when everything drew."""
    ids = plot_ids(source)
    dom = without_scripts(dom)  # the libraries' text holds tags of its own
    starts = sorted((m.start(), m.group(1)) for m in re.finditer(r'<div id="([^"]+)"', dom)
                    if m.group(1) in ids)  # fmt: skip
    found = {pid for _, pid in starts}
    out = [f"plot {pid}: its div is missing from the page" for pid in ids if pid not in found]
    bounds = [*(pos for pos, _ in starts), len(dom)]
    for (start, pid), end in zip(starts, bounds[1:], strict=True):
        part = dom[start:end]
        if error := re.search(r'class="plot-error"[^>]*>([^<]*)', part):
            out.append(f"plot {pid}: {html.unescape(error.group(1)).strip()}")
        elif 'class="plot-missing"' in part:
            out.append(f"plot {pid}: no data (a cached output not in the workspace?)")
        elif not re.search(r'role-mark[^>]*>\s*<(?:path[^>]*\sd="M|text[^>]*>[^<\s])', part):
            out.append(f"plot {pid}: no data mark drawn")
    for tag in re.findall(r"<img\b[^>]*>", dom):
        if 'data-loaded="yes"' not in tag:
            src = re.search(r'src="([^"]*)"', tag)
            out.append(f"image {src.group(1) if src else tag}: did not load")
    if not ids and "<img" not in dom:
        out.append("the page holds no plot at all")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="*", help="revisions to compare (`dvc plots diff`); "
                        "none: `dvc plots show` of the workspace")  # fmt: skip
    parser.add_argument("-o", "--out", type=Path, default=Path("dvc_plots"),
                        help="output folder (default: dvc_plots)")  # fmt: skip
    parser.add_argument("--check", action="store_true",
                        help="open it in headless Chromium: did every plot draw?")  # fmt: skip
    args = parser.parse_args(argv)
    root = common.repository_root()
    template = write_template(root / ".dvc" / "tmp")
    page = render(args.revs, args.out, template)
    print(page.resolve().as_uri())
    if args.check:
        if shutil.which(str(CHROMIUM)) is None:
            raise ValueError(f"--check needs Chromium at {CHROMIUM}; install Debian's chromium")
        found = problems(page.read_text(), browser_dom(page))
        if found:
            raise ValueError(f"{len(found)} plot(s) did not draw: " + "; ".join(found))
        common.log.info("every plot drew in headless Chromium")


if __name__ == "__main__":
    common.run(main)
