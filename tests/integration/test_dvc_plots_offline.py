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
