"""What the README tells users to type or expect, checked against the code it describes (found by rerunning the
README word for word): its first two commands, the telemetry line, which MLflow store each mode uses, the promotion
walkthrough's options, and the DVC section's commands and warning."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _blocks(lang: str = "bash") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _block_with(text: str) -> str:
    (block,) = [b for b in _blocks() if text in b]
    return block


def _prose() -> str:
    """The README outside code blocks, with line breaks folded to spaces."""
    return " ".join(re.sub(r"```.*?```", " ", README, flags=re.S).split())


def test_the_first_two_commands_stay_word_for_word():
    assert _blocks()[0].splitlines() == [
        "make run    # set up .venv and run the main job: the nightly pipeline on the simulator plus the shipped BTS "
        "supernovae",
        "make test   # set up .venv and run the test suite",
    ]


def test_the_telemetry_line_sets_what_the_makefile_sets():
    makefile = dict(re.findall(r"^export (\w+) := (\S+)$", (REPO / "Makefile").read_text(), flags=re.M))
    telemetry = {k: v for k, v in makefile.items() if k != "PIP_DISABLE_PIP_VERSION_CHECK"}
    assert set(telemetry) == {"PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY",
                              "DVC_NO_ANALYTICS"}
    (line,) = [b.strip() for b in _blocks() if b.startswith("export PREFECT_SERVER_ANALYTICS_ENABLED")]
    assert "\n" not in line  # one copyable line
    words = shlex.split(line)
    assert words[0] == "export" and dict(w.split("=", 1) for w in words[1:]) == telemetry
    # it comes before the first command a user types outside make
    assert README.index(line) < README.index("\n.venv/bin/deeprubin ")


def test_the_stores_of_each_mode_are_the_ones_the_readme_names():
    from deeprubin import servers
    from deeprubin.config import DEFAULT_TRACKING_URI

    state = Path(".deeprubin").absolute()
    cmd = servers.mlflow_spec(".deeprubin").cmd
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(state / "mlflow" / "artifacts")
    prefect = servers.prefect_spec(".deeprubin").env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect.endswith(str(state / "prefect" / "prefect.db"))
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    prose = _prose()
    section = prose[prose.index("**Two registries, one per mode.**"):prose.index("**The MLflow UI.**")]
    for named in ("the project's `mlflow.db`", "`.deeprubin/mlflow/mlflow.db`", "`.deeprubin/mlflow/artifacts/`",
                  "`.deeprubin/prefect/prefect.db`", "`.prefect/prefect.db`", "is not seen by the other"):
        assert named in section, named


def test_the_walkthrough_promotes_past_the_gate_before_it_rolls_back():
    """A retraining on the same data ties the champion and is rejected, so the walkthrough's rollback works only
    after a promotion that replaced the champion: `promote --force` comes first, and its options exist."""
    import typer.main

    from deeprubin.cli import app

    block = _block_with(".venv/bin/deeprubin rollback")
    lines = [line.split("#")[0].split() for line in block.splitlines()]
    verbs = [(words[1], words[2:]) for words in lines if words[:1] == [".venv/bin/deeprubin"]]
    promotes = [i for i, (verb, args) in enumerate(verbs) if verb == "promote" and "--force" in args]
    rollbacks = [i for i, (verb, _) in enumerate(verbs) if verb == "rollback"]
    assert promotes and rollbacks and promotes[0] < rollbacks[0]
    options = {o for p in typer.main.get_command(app).commands["promote"].params for o in p.opts}
    for verb, args in verbs:
        if verb == "promote":
            assert {a.strip("[]") for a in args if a.strip("[]").startswith("--")} <= options, args
    prose = _prose()
    assert "exits with status 1" in prose and "rollback failed: deeprubin-tcn has no previous champion" in prose


def _dvc_block() -> str:
    return _block_with("dvc exp run -S train.lr=1e-4")


def test_the_dvc_sections_commands_name_real_stages_and_params():
    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    commands = [line.split("#")[0].split() for b in _blocks() for line in b.splitlines()
                if line.startswith(("dvc repro", "dvc exp run"))]
    assert ["dvc", "repro", "-f", "--downstream", "train"] in commands
    for words in commands:
        for i, word in enumerate(words):
            if word == "-S":
                section, *keys = words[i + 1].split("=")[0].split(".")
                node = params[section]
                for key in keys:
                    node = node[key]  # a KeyError names a key the README sets that params.yaml does not have
            elif words[1] == "repro" and not word.startswith("-") and i > 1 and word != "&&":
                assert word in stages, word
    block = _dvc_block()
    # after make run, the first `dvc repro` does nothing: say so, and how to force a stage
    assert "after make run: nothing to do" in block.splitlines()[1]
    prose = _prose()
    assert "`dvc repro -f -s train` runs train alone" in prose and "`Data and pipelines are up to date.`" in prose


def test_dvc_exp_run_set_param_rewrites_params_yaml_as_the_readme_warns(tmp_path):
    """What `dvc exp run -S train.lr=1e-4` does to params.yaml (DVC's own code, `apply_overrides`): the README's
    warning describes exactly this; if a DVC upgrade stops doing it, the warning must change."""
    from dvc.utils.hydra import apply_overrides

    original = (REPO / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(original)
    apply_overrides(path, ["train.lr=1e-4"])
    rewritten = path.read_text()
    before, after = yaml.safe_load(original), yaml.safe_load(rewritten)
    assert after["train"]["lr"] == 1e-4
    after["train"]["lr"] = before["train"]["lr"]
    assert after == before  # every other value reads the same
    assert "classes: [QSO, CEP, SNIa, SNII]" in original and "classes: [QSO, CEP, SNIa, SNII]" not in rewritten
    assert "  classes:\n  - QSO\n  - CEP\n" in rewritten  # inline lists: one item per line
    assert "    seed: null" in original and re.search(r"^    seed: +# null: base\.seed$", rewritten, flags=re.M)
    assert 'cron: "0 9 * * *"' in original and "cron: 0 9 * * *" in rewritten
    assert "# Adam learning rate" in rewritten  # comments stay
    block, prose = _dvc_block(), _prose()
    assert "git checkout params.yaml && dvc repro" in block
    for claim in ("**`dvc exp run -S` rewrites `params.yaml`.**", "become one item per line",
                  "`null` becomes an empty value (`seed:`)", "run `dvc exp run` without `-S`",
                  "`--temp` and `--queue` leave `params.yaml` alone"):
        assert claim in prose, claim
