"""jsmaug/cli/main.py: the `jsmaug` command. Every subcommand answers --help with its inputs and an example; a
shipped config trains by name from a folder that is not the checkout (the sample data is package data)."""

import json
import subprocess
import sys

import pytest
from cli_env import ROOT, cli_env

from jsmaug.cli import main as cli
from jsmaug.models.config import ConfigError
from jsmaug.train import config as run_config


def _jsmaug(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "jsmaug.cli.main", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_usage_lists_every_command(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in [*cli.COMMANDS, "configs"]:
        assert f"\n  {name} " in out
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n not in ("train", "upcycle", "pairs")])
def test_each_command_has_help_with_an_example(name, capsys):
    try:
        code = cli.main([name, "--help"])
    except SystemExit as exit_:  # argparse's --help
        code = exit_.code
    assert code == 0
    out = capsys.readouterr().out
    assert f"usage: jsmaug {name} " in out  # argparse's prog is the subcommand
    assert f"    jsmaug {name} " in out  # the example in the description


def test_train_help_and_shipped_configs(capsys):
    assert cli.main(["train", "--help"]) == 0
    assert "jsmaug train tiny_dpop" in capsys.readouterr().out
    assert cli.main(["configs"]) == 0
    listed = capsys.readouterr().out
    assert {"tiny_dpop", "tiny_dpo", "smaug_mixtral_8x7b"} <= {line.split()[0] for line in listed.splitlines()}


def test_a_shipped_config_resolves_by_name_and_an_unknown_one_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_config.resolve_config_path("tiny_dpop") == run_config.SHIPPED_CONFIGS / "tiny_dpop.yaml"
    assert run_config.resolve_config_path("configs/tiny_dpo.yaml") == run_config.SHIPPED_CONFIGS / "tiny_dpo.yaml"
    cfg, _ = run_config.load_run_config("tiny_dpop")
    assert cfg.data.train_path == str(run_config.PACKAGE_ROOT / "data/sample/train.jsonl")
    with pytest.raises(ConfigError, match=r"tiny_dpopp: config file not found .*they are: .*tiny_dpop"):
        run_config.resolve_config_path("tiny_dpopp")
    (tmp_path / "data/sample").mkdir(parents=True)  # a folder of one's own data under the same names wins
    (tmp_path / "data/sample/train.jsonl").write_text("")
    assert run_config.load_run_config("tiny_dpop")[0].data.train_path == "data/sample/train.jsonl"


def test_train_a_shipped_config_from_another_folder(tmp_path):
    r = _jsmaug(["train", "tiny_dpop", "train.steps=2", "log.every=1", "log.eval_every=0", "checkpoint.every=2",
                 "export_hf=false", "workdir=run", "data.max_length=64", "data.max_prompt_length=32"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2/2" in r.stderr + r.stdout
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert not (ROOT / "run").exists()
