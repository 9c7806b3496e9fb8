"""HF Mixtral folder -> Orbax checkpoint (params + model config) that training can start from (`init_from`).

    jsmaug convert --hf_dir /path/to/Mixtral-8x7B-v0.1 --out_dir ckpt/mixtral [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

from jsmaug import hf  # noqa: E402
from jsmaug.models.config import ConfigError  # noqa: E402
from jsmaug.train import checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="parameter dtype to store (default: the checkpoint's own)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    t0 = time.time()
    try:
        hf.prepare_out_dir(out, args.overwrite)
        config, params = hf.load(args.hf_dir, dtype=args.dtype, progress=True)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            checkpoint.save_params(tmp, config, params)
            hf.commit_dir(tmp, out)  # renames only: an existing out_dir is replaced, never half-written
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except (hf.CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"converted {args.hf_dir} -> {out}: {config.num_params() / 1e9:.3f}B parameters ({config.param_dtype}), "
          f"{time.time() - t0:.1f}s, peak RSS {peak_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
