"""`dvc plots show` writes HTML that renders offline: the repository's .dvc/config points DVC at
infra/dvc/plots_template.html, which inlines vega / vega-lite / vega-embed instead of loading
them from a CDN (DVC's default template does)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from configobj import ConfigObj

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = BIN / "dvc"

# Distinctive values, to find the plot data in the rendered page.
METRICS_CSV = "epoch,loss\n0,1.5\n1,0.731942\n2,0.418273\n"
CONFUSION_CSV = "actual,predicted\nQSO,QSO\nCEP,SNIa\nSNIa,SNIa\nSNII,SNII\nSNII,SNIa\n"
DVC_YAML = """\
plots:
  - metrics.csv:
      x: epoch
      y: loss
      title: Training loss
  - confusion:
      template: confusion
      x: actual
      y:
        confusion.csv: predicted
"""

# Loads the page's inline <script>s into a bare JS context (no DOM, no network), then compiles
# and renders every plot spec with the vendored vega-lite + vega to SVG.
NODE_SMOKE = r"""
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const ctx = {console, setTimeout, clearTimeout}; ctx.self = ctx; ctx.globalThis = ctx;
vm.createContext(ctx);
let libs = 0;
for (const m of html.matchAll(/<script type="text\/javascript">\n([\s\S]*?)\n<\/script>/g)) {
  vm.runInContext(m[1], ctx); libs++;
}
const specs = [...html.matchAll(/var spec = ([\s\S]*?);\n\s*vegaEmbed\('#([^']+)'/g)];
(async () => {
  const out = {libs, vega: ctx.vega.version, vegaLite: ctx.vegaLite.version,
               vegaEmbed: typeof ctx.vegaEmbed, svg: {}};
  for (const [, js, id] of specs) {
    const spec = JSON.parse(js);
    const vg = String(spec.$schema || "").includes("vega-lite") ? ctx.vegaLite.compile(spec).spec : spec;
    const view = new ctx.vega.View(ctx.vega.parse(vg), {renderer: "none"});
    out.svg[id] = await view.toSVG();
  }
  process.stdout.write(JSON.stringify(out));
})().catch(e => { console.error(e); process.exit(1); });
"""


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "DO_NOT_TRACK": "1", "HOME": str(cwd)}
    proc = subprocess.run([str(c) for c in cmd], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


def repo_template_setting() -> str:
    return ConfigObj(str(REPO / ".dvc" / "config"))["plots"]["html_template"]


def assert_offline_page(page: Path) -> str:
    assert page.is_file(), page
    html = page.read_text(encoding="utf8")
    # Nothing is fetched from the network: no CDN, no external <script src>.
    assert "https://cdn" not in html and "http://cdn" not in html
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, flags=re.IGNORECASE)
    # The three libraries are inlined (their UMD wrappers define these globals).
    assert ".vega={})" in html  # vega.min.js
    assert ".vegaLite={}" in html  # vega-lite.min.js
    assert ".vegaEmbed=" in html  # vega-embed.min.js
    # dvc_render filled the template's placeholders.
    for placeholder in ("{plot_divs}", "{refresh_tag}", "{scripts}"):
        assert placeholder not in html
    # The plot divs and their data made it in.
    assert "vegaEmbed('#metrics_csv', spec)" in html
    assert "vegaEmbed('#confusion', spec)" in html
    assert "0.731942" in html and "0.418273" in html and "Training loss" in html
    assert '"SNII"' in html and '"CEP"' in html
    return html


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh git+dvc project whose .dvc/config carries the repository's plots setting verbatim,
    with the template at the same place relative to .dvc/ as in the repository."""
    work = tmp_path_factory.mktemp("plots") / "project"
    work.mkdir()
    run(["git", "init", "-q"], work)
    run([DVC, "init", "-q"], work)
    setting = repo_template_setting()
    if os.path.isabs(setting):
        target = Path(setting)
    else:  # DVC resolves a relative html_template against the .dvc directory
        target = (work / ".dvc" / setting).resolve()
        assert work in target.parents, f"{setting} leaves the project"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy((REPO / ".dvc" / setting).resolve(), target)
    config = ConfigObj(str(work / ".dvc" / "config"))
    config.setdefault("core", {})["analytics"] = "false"
    config["plots"] = {"html_template": setting}
    config.write()
    (work / "metrics.csv").write_text(METRICS_CSV)
    (work / "confusion.csv").write_text(CONFUSION_CSV)
    (work / "dvc.yaml").write_text(DVC_YAML)
    return work


def test_repository_config_names_existing_template():
    setting = repo_template_setting()
    path = Path(setting) if os.path.isabs(setting) else REPO / ".dvc" / setting
    assert path.is_file(), f".dvc/config plots.html_template={setting} -> {path} is missing"
    text = path.read_text(encoding="utf8")
    assert "{plot_divs}" in text  # required by dvc_render
    assert "{scripts}" not in text  # dvc_render would fill it with CDN <script src> tags
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, flags=re.IGNORECASE)


def test_plots_show_default_out_dir_is_offline(project: Path):
    proc = run([DVC, "plots", "show"], project)
    page = project / "dvc_plots" / "index.html"
    assert page.as_uri() in proc.stdout
    assert_offline_page(page)


def test_plots_show_out_dir_is_offline_and_renders(project: Path):
    out = project / "custom_out"
    run([DVC, "plots", "show", "--out", out.name], project)
    page = out / "index.html"
    assert_offline_page(page)

    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: cannot execute the inlined vega code")
    script = project / "smoke.js"
    script.write_text(NODE_SMOKE)
    result = json.loads(run([node, script, page], project).stdout)
    assert result["libs"] == 3 and result["vegaEmbed"] == "function"
    assert result["vega"].startswith("5.") and result["vegaLite"].startswith("5.")
    assert set(result["svg"]) == {"metrics_csv", "confusion"}
    for svg in result["svg"].values():
        assert svg.startswith("<svg") and len(svg) > 1000
    assert "Training loss" in result["svg"]["metrics_csv"]
    assert "SNIa" in result["svg"]["confusion"]


# --- the repository's own plots: dvc.yaml's `plots:` with its templates (.dvc/plots), on data as evaluate writes it

# The scale domains of each spec after vega has run it: the order a reader sees (rows, columns, legend).
NODE_DOMAINS = r"""
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const ctx = {console, setTimeout, clearTimeout}; ctx.self = ctx; ctx.globalThis = ctx;
vm.createContext(ctx);
for (const m of html.matchAll(/<script type="text\/javascript">\n([\s\S]*?)\n<\/script>/g)) vm.runInContext(m[1], ctx);
(async () => {
  const out = {};
  for (const [, js, id] of html.matchAll(/var spec = ([\s\S]*?);\n\s*vegaEmbed\('#([^']+)'/g)) {
    const spec = JSON.parse(js);
    if (!Object.keys(spec).length) continue;
    const view = new ctx.vega.View(ctx.vega.parse(ctx.vegaLite.compile(spec).spec), {renderer: "none"});
    await view.runAsync();
    const domains = {};
    for (const name of ["x", "y", "color"]) { try { domains[name] = view.scale(name).domain(); } catch (e) {} }
    out[id] = {domains, svg: await view.toSVG()};
  }
  process.stdout.write(JSON.stringify(out));
})().catch(e => { console.error(e); process.exit(1); });
"""


@pytest.fixture(scope="module")
def repo_plots(tmp_path_factory) -> Path:
    """A git+dvc project with the repository's .dvc (config, plot templates), its offline HTML template and its
    dvc.yaml `plots:` section, and plot data made by the evaluate stage's own functions."""
    import numpy as np
    import pandas as pd
    import yaml

    from deeprubin.evaluation.metrics import confusion_plot_rows, confusion_rows, reliability_curve, write_plot_csv

    work = tmp_path_factory.mktemp("repo_plots") / "project"
    work.mkdir()
    run(["git", "init", "-q"], work)
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    shutil.copytree(REPO / "infra" / "dvc", work / "infra" / "dvc")
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (work / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    classes = ["QSO", "CEP", "SNIa", "SNII"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    p = np.eye(4)[np.where(rng.random(60) < 0.7, y, rng.integers(0, 4, 60))] * 0.7 + 0.075
    out = work / "metrics" / "plots"
    write_plot_csv(out / "confusion_test.csv", confusion_plot_rows(confusion_rows([classes[i] for i in y], p,
                                                                                  classes), classes))
    write_plot_csv(out / "reliability_test.csv", reliability_curve([classes[i] for i in y], p, classes=classes))
    early = pd.DataFrame({"days": [5, 10, 30]})
    for model, base in (("tcn", 0.5), ("forest", 0.3)):
        early[model] = [base, base + 0.1, base + 0.2]
        early[f"{model}_low"], early[f"{model}_high"] = early[model] - 0.05, early[model] + 0.05
        early[f"{model}_n"] = [40, 50, 60]
    write_plot_csv(out / "early_bts.csv", early)
    return work


def test_repository_plots_have_axis_titles_colours_per_model_and_the_class_order(repo_plots: Path):
    specs = json.loads(run([DVC, "plots", "show", "--json"], repo_plots).stdout)["data"]
    early = specs["Early classification, BTS held out"][0]["content"]
    assert early["encoding"]["color"]["field"] == "model"  # the models differ by colour, not line style only
    assert early["encoding"]["x"]["title"] == "days since first detection"
    assert [layer["encoding"]["y"]["title"] for layer in early["layer"]] == ["macro-F1", "macro-F1"]  # not "y"
    models = {row["field"] for row in early["data"]["values"]}
    assert models == {"tcn", "forest"}
    confusion = specs["metrics/plots/confusion_test.csv"][0]["content"]["spec"]
    assert confusion["encoding"]["y"]["sort"] == {"field": "y_rank", "op": "min"}
    assert confusion["encoding"]["y"]["title"] == "true class"
    assert confusion["encoding"]["x"]["title"] == "predicted class"

    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: cannot run the inlined vega code")
    run([DVC, "plots", "show", "--out", "rendered"], repo_plots)
    page = repo_plots / "rendered" / "index.html"
    assert "https://cdn" not in page.read_text(encoding="utf8")
    script = repo_plots / "domains.js"
    script.write_text(NODE_DOMAINS)
    rendered = json.loads(run([node, script, page], repo_plots).stdout)
    matrix = rendered["metrics_plots_confusion_test_csv"]
    assert matrix["domains"]["y"] == ["QSO", "CEP", "SNIa", "SNII"]  # as the PNGs, not alphabetical
    assert matrix["domains"]["x"] == ["QSO", "CEP", "SNIa", "SNII"]
    curve = next(v for k, v in rendered.items() if k.startswith("Early_classification__BTS"))
    assert curve["domains"]["color"] == ["tcn", "forest"]
    assert curve["domains"]["x"] == [5, 30]  # the data's days, not log's "nice" 1 to 100 (a third left empty)
    # The matrix says what it is (not its CSV path) and shows its counts without a click.
    assert "Confusion matrix, test split" in matrix["svg"] and "metrics/plots/confusion_test.csv" not in matrix["svg"]
    import pandas as pd

    counts = pd.read_csv(repo_plots / "metrics" / "plots" / "confusion_test.csv")
    cell = counts.groupby(["actual", "predicted"]).size().max()
    assert f">{cell}</text>" in matrix["svg"]
    # Reliability: both axes on [0, 1] (ticks every 0.1, not DVC's crowded "0.500.55") over the diagonal of perfect
    # calibration.
    reliability = next(v for k, v in rendered.items() if k.startswith("Reliability"))
    assert reliability["domains"]["x"] == [0, 1] and reliability["domains"]["y"] == [0, 1]
    assert "perfect calibration" in reliability["svg"]
    assert "macro-F1" in curve["svg"] and "days since first detection" in curve["svg"]
