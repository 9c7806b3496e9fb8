"""The `jsmaug` command: one entry point for every job, each subcommand with its own `--help`.

    jsmaug train tiny_dpop                         # a shipped config by name, or a path: jsmaug train my.yaml
    jsmaug train configs/tiny_dpop.yaml train.steps=10 workdir=runs/x
    jsmaug convert --hf_dir HF_FOLDER --out_dir ckpt/model
    jsmaug export --ckpt_dir runs/x --out_dir export/x
    jsmaug plan --topology v5p-128 --config smaug_mixtral_8x7b
    jsmaug evaluate --model runs/x --mc data/sample/mc.jsonl
    jsmaug generate --model runs/x/hf --prompt "Question: 2 + 2?\\nAnswer:"
    jsmaug launch --processes 2 --devices_per_process 4 -- tiny_dpop
    jsmaug compare-losses --losses dpo dpop
    jsmaug pairs make --format gsm8k --input train.jsonl --out pairs.jsonl
    jsmaug iterate tiny_dpop --rounds 3 --problems train.jsonl --heldout test.jsonl --out runs/iter --init_from M
    jsmaug configs                                 # the shipped configs

The `tools/*.py` scripts of a checkout call the same code.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv) -> int, one line of help)
COMMANDS = {
    "train": ("jsmaug.train.run", "train with DPOP (or another preference loss): CONFIG [key=value ...]"),
    "convert": ("jsmaug.cli.convert", "Hugging Face folder -> jsmaug checkpoint (init_from)"),
    "export": ("jsmaug.cli.export", "jsmaug checkpoint or run -> Hugging Face folder"),
    "upcycle": ("jsmaug.cli.upcycle", "dense HF checkpoint -> sparse-MoE (Mixtral) HF checkpoint"),
    "plan": ("jsmaug.cli.plan", "AOT-compile a run's step for a TPU topology: memory per chip, FLOPs, collectives"),
    "evaluate": ("jsmaug.cli.evaluate", "preference accuracy and multiple-choice scores of a model"),
    "generate": ("jsmaug.cli.generate", "greedy or sampled generation from a checkpoint or HF folder"),
    "launch": ("jsmaug.cli.launch", "N local processes x K CPU devices joined as one multi-host run"),
    "compare-losses": ("jsmaug.cli.compare_losses", "train several losses from one start and plot them"),
    "pairs": ("jsmaug.pairs.cli", "make preference pairs the paper's way, and their edit-distance statistics"),
    "iterate": ("jsmaug.train.iterate", "rounds: the policy samples pairs, trains on them, is scored held-out"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return (f"usage: jsmaug COMMAND [ARGS ...]   (jsmaug COMMAND --help for its inputs and an example)\n\n"
            f"commands:\n{rows}\n  {'configs':<{width}}  list the shipped configs (jsmaug train NAME)\n\n" + __doc__)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from jsmaug import __version__
        print(f"jsmaug {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "configs":
        from jsmaug.train.config import SHIPPED_CONFIGS, shipped_configs
        print("\n".join(f"{n}  ({SHIPPED_CONFIGS / (n + '.yaml')})" for n in shipped_configs()))
        return 0
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; the commands are: {', '.join(COMMANDS)}, configs", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as err:
        if err.name != COMMANDS[name][0]:
            raise
        print(f"error: `jsmaug {name}` is not in this version of jsmaug", file=sys.stderr)
        return 2
    sys.argv[0] = f"jsmaug {name}"  # argparse's prog: `usage: jsmaug convert ...`
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
