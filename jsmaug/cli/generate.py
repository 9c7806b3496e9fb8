"""Generate text from a model with a KV cache (greedy by default).

    jsmaug generate --model runs/tiny_dpop/hf --prompt "Question: 2 + 2?\nAnswer:" [--prompt ...] \
        [--max_new_tokens 64] [--temperature 0.7 --top_k 50 --top_p 0.9 --seed 0]

--model: a Hugging Face folder, a converter checkpoint or a training workdir. --tokenizer: a tokenizer folder
or file (default: the model's own tokenizer files, else Mixtral's). Prompts get the tokenizer's BOS (none for
Qwen) and generation stops at its EOS; "\n" in a prompt given on the command line is a newline. Several
prompts run as one left-padded batch.
"""

from __future__ import annotations

import argparse
import sys
import time

from jsmaug import hf  # noqa: E402
from jsmaug.data import batches as data_lib
from jsmaug.models import generate as gen
from jsmaug import eval as eval_lib
from jsmaug.train import checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", action="append", required=True)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (tokenizer.json or tokenizer.model) or "
                    "file (default: the model folder's own, or its hf/ export's; else Mixtral's)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args(argv)
    try:
        tok = data_lib.Tokenizer(args.tokenizer or eval_lib.model_tokenizer_path(args.model))
        sampling = gen.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, eos_id=tok.eos_id)
        config, params = eval_lib.load_model(args.model, args.dtype)
        prompts = [p.replace("\\n", "\n") for p in args.prompt]
        ids = [tok.prefix_ids + tok.encode(p) for p in prompts]
        t0 = time.time()
        out = gen.generate(config, params, ids, sampling, seed=args.seed)
        secs = time.time() - t0
    except (data_lib.DataError, checkpoint.CheckpointError, hf.CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p, toks in zip(prompts, out):
        print(f"--- prompt: {p!r}\n{tok.decode([t for t in toks if t != tok.eos_id])}")
    n = sum(len(t) for t in out)
    print(f"--- {n} tokens in {secs:.1f}s (compile included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
