"""`reference.mode=precomputed`: the frozen reference's log-probs of every pair, computed once and cached.

Every process computes the rows its devices hold (`sharding.put_pairs`); the per-pair results come back
replicated, so every process has the whole table and process 0 writes it once, to
`workdir/ref_cache/ref_logps-<fingerprint>.npy`. The fingerprint covers the tokenised pairs, the reference
weights (`tree_digest`, which does not depend on the mesh or the process count), the tokenizer, the
truncation settings and LD-DPO's `ld_alpha` (it weighs the log-probs), so a run on another mesh or another number of hosts reuses the file.

Pairs that carry their own reference. A pairs file whose rows have `ref_chosen_logps` and `ref_rejected_logps`
(TRL's column names; `jsmaug pairs sample` writes the sampling model's summed log-probs there) gives the table
instead: nothing is computed and no cache is written. The values are the whole pair's, on the trainer's own
tokenisation, so a pair that `data.max_length` / `data.max_prompt_length` would cut is refused (its reference
would be the uncut pair's), as is a file that has the columns on some rows and not on others, or a run whose
files have them and files that do not. LD-DPO (`loss.ld_alpha`) weighs tokens, which a sum cannot give back: its
runs compute the table from the reference weights as before, and say so. The columns are read only under
`reference.mode=precomputed`; an online reference computes its own log-probs (the same numbers when the
reference is the sampling model and no pair is cut).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jsmaug.data import formats
from jsmaug.data.files import DataError, read_rows
from jsmaug.data.tokenizer import Tokenizer, truncate
from jsmaug.data.tokenizer_folder import run_tokenizer_path
from jsmaug.train import step as step_lib
from jsmaug.train.metrics_log import log

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def tree_digest(tree) -> str:
    """A hash of every array's bits, computed where the arrays live: per leaf, two position-weighted sums of
    its bit patterns in uint32 arithmetic. Integer sums are exact in any order, so the digest is the same
    whatever the sharding, mesh or process count, and no weight travels to the host."""
    leaves = jax.tree.leaves(tree)
    mesh = next((x.sharding.mesh for x in leaves if isinstance(getattr(x, "sharding", None), NamedSharding)), None)

    def sums(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint32)
        bits = bits.astype(jnp.uint32)
        out = []
        for mult in (jnp.uint32(2654435761), jnp.uint32(40503)):
            w = jnp.uint32(1)
            for d in range(x.ndim):
                w = w + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * (mult + jnp.uint32(2 * d + 1))
            out.append(jnp.sum(bits * w, dtype=jnp.uint32))
        return jnp.stack(out)

    out_sh = NamedSharding(mesh, P()) if mesh is not None else None
    digests = jax.device_get(jax.jit(lambda t: [sums(x) for x in t], out_shardings=out_sh)(leaves))
    h = hashlib.sha256()
    for leaf, d in zip(leaves, digests):
        h.update(f"{leaf.shape}{leaf.dtype}".encode() + np.asarray(d).tobytes())
    return h.hexdigest()[:16]


def examples_fingerprint(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for k in ("prompt", "chosen", "rejected"):
            h.update(ex[k].tobytes() + b"|")
    return h.hexdigest()[:16]


def _pair_key(prompt, chosen, rejected) -> tuple[bytes, bytes, bytes]:
    return tuple(np.asarray(x, np.int32).tobytes() for x in (prompt, chosen, rejected))


def _data_paths(cfg) -> list[str]:
    out = []
    for p in (cfg.data.train_path, cfg.data.eval_path):
        if p:
            out += [str(p)] if isinstance(p, str) or not hasattr(p, "__iter__") else [str(x) for x in p]
    return out


def _file_values(rows) -> list | None:
    """Per row (where, (ref_c, ref_r)) when every row of the file has both columns; None when none has either."""
    has = [tuple(k in r for k in REF_COLUMNS) if isinstance(r, dict) else None for _, r in rows]
    if not any(h and any(h) for h in has):
        return None
    first = next(where for (where, _), h in zip(rows, has) if h and any(h))
    out = []
    for (where, row), h in zip(rows, has):
        if h is None:  # not a row (bad JSON, not an object): data.on_bad_row decides, in prepare
            out.append((where, None))
            continue
        if not all(h):
            missing = [k for k, ok in zip(REF_COLUMNS, h) if not ok]
            raise DataError(f"{where}: no {' or '.join(missing)}, while {first} has the reference log-probs: a "
                            "pairs file carries them on every row or on none")
        vals = []
        for k in REF_COLUMNS:
            v = row[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise DataError(f"{where}: field {k!r} must be a finite number (a summed log-prob), got {v!r}")
            vals.append(float(v))
        out.append((where, tuple(vals)))
    return out


def pairs_reference(cfg, examples: Sequence[dict], tok_fp: str) -> np.ndarray | None:
    """The (N, 2) table of `examples` from their files' `ref_chosen_logps` / `ref_rejected_logps` (module
    docstring), or None when no file of the run has them. The files are read and tokenised again, as
    `data.batches.prepare` does, to find each example's row; identical pairs are matched in file order."""
    if cfg.data.tfds_config:
        return None  # TFDS rows hold prompt, chosen and rejected only
    found, without = {}, []
    tok = template = None
    keys = (cfg.data.prompt_key, cfg.data.chosen_key, cfg.data.rejected_key)
    for path in _data_paths(cfg):
        rows = read_rows(path)
        values = _file_values(rows)
        if values is None:
            without.append(path)
            continue
        if tok is None:
            tok = Tokenizer(run_tokenizer_path(cfg.data.tokenizer_path, cfg.init_from))
            if tok.fingerprint() != tok_fp:
                raise DataError(f"{path}: the run's tokenizer is not {tok.path}, so the pairs' reference "
                                "log-probs cannot be matched to its pairs")
            template = formats.load_chat_template(cfg.data.chat_template, tok)
        fmt = next((f for f in (formats.detect_format(r, keys) for _, r in rows) if f), None)
        for (where, row), (_, vals) in zip(rows, values):
            if vals is None:
                continue
            try:
                ids = formats.row_ids(where, row, fmt, keys, tok, template)
            except DataError:
                continue  # a bad row: prepare has dropped it (data.on_bad_row=skip) or stopped the run
            ex = truncate(*ids, cfg.data.max_length, cfg.data.max_prompt_length, tok.bos_id)
            if isinstance(ex, str):
                continue  # dropped by prepare too
            cut = (len(ex["prompt"]), len(ex["chosen"]), len(ex["rejected"])) != tuple(map(len, ids))
            found.setdefault(_pair_key(ex["prompt"], ex["chosen"], ex["rejected"]), []).append((where, vals, cut))
    if not found:
        return None
    out = np.zeros((len(examples), 2), np.float32)
    for i, ex in enumerate(examples):
        hits = found.get(_pair_key(ex["prompt"], ex["chosen"], ex["rejected"]))
        if not hits:
            raise DataError(f"{', '.join(without)}: no {REF_COLUMNS[0]} / {REF_COLUMNS[1]} columns, while the run's "
                            "other pairs files have them: give the reference log-probs in every file or in none")
        where, vals, cut = hits.pop(0) if len(hits) > 1 else hits[0]
        if cut:
            raise DataError(f"{where}: data.max_length={cfg.data.max_length} / data.max_prompt_length="
                            f"{cfg.data.max_prompt_length} cut this pair, and its {REF_COLUMNS[0]} / "
                            f"{REF_COLUMNS[1]} are the whole pair's: raise them, or drop the columns "
                            "(the reference is then computed)")
        out[i] = vals
    return out


def fixed_chunks(examples, batch_size):
    """Every example once, in order, in full batches of pairs (the last one padded by repeating its first pair);
    yields (number of real pairs, pairs)."""
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        n = len(chunk)
        yield n, chunk + [chunk[0]] * (batch_size - n)


def precompute(cfg, config, ref_params, examples: Sequence[dict], place: Callable, outputs, tok_fp: str
               ) -> np.ndarray:
    """Reference logps (chosen, rejected) of every example, an (N, 2) float32 array, from the cache when it
    holds them. `place(pairs)` puts a global batch of pairs on the mesh (each process collates its rows). Pairs
    files with `ref_chosen_logps` / `ref_rejected_logps` give the table themselves (`pairs_reference`)."""
    if cfg.loss.ld_alpha is None:
        table = pairs_reference(cfg, examples, tok_fp)
        if table is not None:
            log(f"reference logps: {len(examples)} pairs' {REF_COLUMNS[0]} / {REF_COLUMNS[1]}, as their files "
                "give them (not computed)")
            return table
    elif not cfg.data.tfds_config and any(_file_values(read_rows(p)) for p in _data_paths(cfg)):
        log(f"reference logps: LD-DPO (loss.ld_alpha={cfg.loss.ld_alpha}) weighs tokens, so the files' "
            f"{REF_COLUMNS[0]} / {REF_COLUMNS[1]} sums are not used; computing them from the reference weights")
    fp = hashlib.sha256(json.dumps([examples_fingerprint(examples), tree_digest(ref_params), tok_fp,
                                    cfg.data.max_length, cfg.data.max_prompt_length,
                                    cfg.reference.dtype, cfg.loss.ld_alpha]).encode()).hexdigest()[:20]
    path = outputs.ref_cache_path(fp)
    if path.exists():
        log(f"reference logps: cached {path}")
        return np.load(io.BytesIO(path.read_bytes()))
    jitted = fn = None
    out = np.zeros((len(examples), 2), np.float32)
    t0 = time.time()
    bs = cfg.train.batch_size
    for i, (n, chunk) in enumerate(fixed_chunks(examples, bs)):
        batch = place(chunk)
        if fn is None:  # on a mesh, traced where the MoE layers can see it (token dispatch); results replicated
            sharding = batch["input_ids"].sharding
            jitted = jax.jit(functools.partial(step_lib.reference_logps, config, chunk_size=cfg.train.logps_chunk_size,
                                               ld_alpha=cfg.loss.ld_alpha), out_shardings=NamedSharding(sharding.mesh, P()))
            fn = step_lib.on_mesh(jitted, jax.tree.map(lambda x: x.sharding, batch))
        lp = np.asarray(jax.device_get(fn(ref_params, batch)))
        out[i * bs:i * bs + n, 0] = lp[:n]
        out[i * bs:i * bs + n, 1] = lp[bs:bs + n]
    outputs.save_ref_cache(path, out)
    log(f"reference logps: computed for {len(examples)} pairs in {time.time() - t0:.1f}s -> {path}")
    return out
