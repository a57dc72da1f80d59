"""Forward-pass verbs on a real model on the CPU: mlxmerge (bf16 stored, auto compute dtype)
against transformers + torch on the same prompts, the same windows and the same thread count.

Rows: prefill tokens/s, batched greedy generation tokens/s, perplexity over a text (tokens/s),
`sae collect` tokens/s (load included, as the verb runs), `refusals` on 32 prompts (seconds), and
mlxmerge's bf16-compute vs float32-compute row. transformers runs in float32 and in bfloat16 (its
default dtype for this folder); the ratio is against the faster of the two, measured in this run.
Each number is the best of ``--repeat`` runs, the two libraries interleaved.

    python benchmarks/bench_forward.py MODEL_FOLDER [--threads 2] [--repeat 2]

MODEL_FOLDER: an HF-layout bf16 folder both libraries read (SmolLM2-135M-Instruct here).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlxmerge

DATA = Path(mlxmerge.__file__).parent / "abliterate" / "data"


def best(fn, repeat: int) -> tuple[float, object]:
    """(fastest wall time, the last result) of ``repeat`` calls."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


# -- inputs shared by both sides --------------------------------------------------------------


def inputs(tokenizer, n_prompts: int, prefill_len: int):
    from mlxmerge.abliterate.prompts import bundled_prompts
    from mlxmerge.lm.chat import chat_tokens

    text = (DATA / "harmless_train.txt").read_text().splitlines()
    ids = tokenizer.encode(" ".join(text), add_special_tokens=False)
    prefill = [ids[i * prefill_len : (i + 1) * prefill_len] for i in range(4)]
    harmful = bundled_prompts("harmful", "test")[: n_prompts // 2]
    harmless = bundled_prompts("harmless", "test")[: n_prompts // 2]
    return {
        "prefill": prefill,
        "gen_prompts": chat_tokens(tokenizer, harmless[:8]),
        "ppl_texts": ["\n".join(text[i : i + 20]) for i in range(0, 40, 20)],
        "harmful": chat_tokens(tokenizer, harmful),
        "harmless": chat_tokens(tokenizer, harmless),
        "corpus": "\n\n".join(text),
    }


# -- mlxmerge ---------------------------------------------------------------------------------


class Mlx:
    def __init__(self, path: str, compute: str):
        from mlxmerge.lm.compute import compute_dtype
        from mlxmerge.lm.load import load

        self.path, self.compute = path, compute
        with compute_dtype(compute):
            self.model, self.tok = load(path)

    def prefill(self, rows):
        import mlx.core as mx

        mx.eval(self.model(mx.array(rows)))

    def generate(self, prompts, n):
        from mlxmerge.lm.chat import pad_token_id
        from mlxmerge.lm.generate import generate_tokens

        return generate_tokens(self.model, prompts, eos_ids=set(), max_tokens=n,
                               pad_id=pad_token_id(self.tok), batch_size=len(prompts))  # fmt: skip

    def perplexity(self, texts):
        from mlxmerge.eval.divergence import perplexity

        return perplexity(self.model, self.tok, texts, batch_size=8, max_length=256)

    def collect(self, corpus_file, tokens, layer):
        from mlxmerge.lm.compute import compute_dtype
        from mlxmerge.sae import collect

        with tempfile.TemporaryDirectory() as tmp, compute_dtype(self.compute):
            return collect(self.path, [layer], corpus_file, Path(tmp) / "acts", tokens=tokens,
                           context_size=128)["tokens"]  # fmt: skip

    def refusals(self, n_prompts, max_tokens):
        from mlxmerge.abliterate.evaluate import refusals
        from mlxmerge.lm.compute import compute_dtype

        with compute_dtype(self.compute):
            row = refusals(self.path, limit=n_prompts // 2, max_tokens=max_tokens, batch_size=16)
        return row["models"][self.path]["refusal_rate"]


# -- transformers -----------------------------------------------------------------------------


class HF:
    def __init__(self, path: str, dtype: str):
        import torch
        from transformers import AutoTokenizer

        self.torch, self.path, self.dtype = torch, path, getattr(torch, dtype)
        self.model = self._load()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def _load(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype).eval()

    def _left_pad(self, lists):
        n = max(len(x) for x in lists)
        ids = [[self.pad] * (n - len(x)) + list(x) for x in lists]
        mask = [[0] * (n - len(x)) + [1] * len(x) for x in lists]
        return self.torch.tensor(ids), self.torch.tensor(mask)

    def prefill(self, rows):
        with self.torch.inference_mode():
            self.model(self.torch.tensor(rows)).logits.float()

    def generate(self, prompts, n, model=None):
        ids, mask = self._left_pad(prompts)
        with self.torch.inference_mode():
            out = (model or self.model).generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=self.pad,
            )  # fmt: skip
        return out[:, ids.shape[1] :].tolist()

    def _answers(self, model, prompts, n):
        from mlxmerge.eval.refusal import is_refusal

        ids, mask = self._left_pad(prompts)
        outs = []
        for i in range(0, len(prompts), 16):  # batches of 16, as refusals runs
            with self.torch.inference_mode():
                out = model.generate(input_ids=ids[i : i + 16], attention_mask=mask[i : i + 16],
                                     max_new_tokens=n, do_sample=False, pad_token_id=self.pad)  # fmt: skip
            outs += [self.tok.decode(o[ids.shape[1] :], skip_special_tokens=True) for o in out]
        return [is_refusal(a) for a in outs]

    def perplexity(self, texts):
        import math

        from mlxmerge.eval.scoring import document_windows

        windows = document_windows(_MlxTok(self.tok), texts, 256)  # the same windows
        nll, n = 0.0, 0
        for i in range(0, len(windows), 8):
            batch = windows[i : i + 8]
            m = max(len(w) for w in batch)
            ids = self.torch.tensor([w + [self.pad] * (m - len(w)) for w in batch])
            with self.torch.inference_mode():
                lp = self.torch.log_softmax(self.model(ids).logits.float(), -1)
            for j, w in enumerate(batch):
                t = self.torch.tensor(w[1:])
                nll -= lp[j, : len(w) - 1].gather(1, t[:, None]).sum().item()
                n += len(w) - 1
        return math.exp(nll / n)

    def collect(self, rows, layer, skip):
        """Load, forward, keep the non-special positions of block ``layer``'s output, save."""
        import numpy as np
        from transformers import AutoTokenizer

        model, _ = self._load(), AutoTokenizer.from_pretrained(self.path)
        kept = []
        hook = model.model.layers[layer].register_forward_hook(
            lambda _m, _i, out: kept.append(out[0] if isinstance(out, tuple) else out)
        )
        total = 0
        with tempfile.TemporaryDirectory() as tmp, self.torch.inference_mode():
            for s in range(0, len(rows), 8):
                batch = rows[s : s + 8]
                model(self.torch.tensor(batch))
                h = kept.pop().float().numpy()
                keep = ~np.isin(batch, skip)
                acts = h[keep]
                np.save(Path(tmp) / f"{s:06d}.npy", acts)
                total += len(acts)
        hook.remove()
        return total

    def refusals(self, harmful, harmless, max_tokens):
        """As mlxmerge's ``refusals`` does: load, answers to both sets, last-token logits."""
        from transformers import AutoTokenizer

        model, _ = self._load(), AutoTokenizer.from_pretrained(self.path)
        rate = sum(self._answers(model, harmful, max_tokens)) / len(harmful)
        self._answers(model, harmless, max_tokens)
        ids, mask = self._left_pad(harmless)
        with self.torch.inference_mode():
            model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        return rate


class _MlxTok:
    """transformers' tokenizer with the ``encode`` that ``document_windows`` calls."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, **kw):
        return self.tok.encode(text, **kw)


# -- the run ----------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--collect-tokens", type=int, default=4096)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--refusal-tokens", type=int, default=32)
    ap.add_argument("--bf16-prompts", type=int, default=8,
                    help="Prompts for the refusals bf16-vs-auto row (0: skip; the slowest row).")  # fmt: skip
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    # torch's OpenMP workers spin between ops; on a shared machine they then lose whole time
    # slices (10x slower prefill measured here): passive waiting is torch's fair setting.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from mlxmerge.cli.system import backend_summary
    from mlxmerge.lm.chat import special_ids
    from mlxmerge.sae.activations import pack_sequences

    print(f"model {args.model}; {backend_summary()}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    r = args.repeat
    t_load = {}
    t_load["mlx"], mlx = best(lambda: Mlx(args.model, "auto"), 1)
    t_load["mlx bf16"], mlx16 = best(lambda: Mlx(args.model, "bfloat16"), 1)
    t_load["hf float32"], hf32 = best(lambda: HF(args.model, "float32"), 1)
    t_load["hf bfloat16"], hf16 = best(lambda: HF(args.model, "bfloat16"), 1)
    x = inputs(mlx.tok, args.prompts, args.prefill_len)
    corpus = Path(tempfile.mkdtemp()) / "corpus.txt"
    corpus.write_text(x["corpus"])
    sides = {"mlxmerge": mlx, "hf float32": hf32, "hf bfloat16": hf16}
    rows: dict[str, dict[str, float]] = {}
    units: dict[str, str] = {}

    for o in (mlx, mlx16, hf32, hf16):  # first calls pay one-off costs (kernels, allocators)
        o.prefill([x["prefill"][0][:16]])
        o.generate(x["gen_prompts"][:1], 2)

    def row(name, unit, work, fns, repeat=None):
        units[name] = unit
        res = {}
        for _ in range(repeat or r):  # interleaved, best of r per side
            for side, fn in fns.items():
                t, _ = best(fn, 1)
                res[side] = min(res.get(side, float("inf")), t)
        rows[name] = {s: (work / t if unit.endswith("/s") else t) for s, t in res.items()}
        print(name, {s: round(v, 2) for s, v in rows[name].items()}, unit, flush=True)

    n_pre = len(x["prefill"]) * args.prefill_len
    row(
        "prefill",
        "tok/s",
        n_pre,
        {s: (lambda o=o: o.prefill(x["prefill"])) for s, o in sides.items()},
    )
    row(
        "prefill, mlxmerge bf16 compute",
        "tok/s",
        n_pre,
        {"mlxmerge": lambda: mlx16.prefill(x["prefill"])},
    )
    n_gen = len(x["gen_prompts"]) * args.gen_tokens
    row("greedy generation (batch 8)", "tok/s", n_gen,
        {s: (lambda o=o: o.generate(x["gen_prompts"], args.gen_tokens)) for s, o in sides.items()})  # fmt: skip
    n_ppl = sum(len(mlx.tok.encode(t)) for t in x["ppl_texts"])
    ppl = {
        "mlxmerge": mlx.perplexity(x["ppl_texts"]),
        "hf float32": hf32.perplexity(x["ppl_texts"]),
    }
    print("perplexity values (must agree):", ppl)
    row(
        "perplexity",
        "tok/s",
        n_ppl,
        {s: (lambda o=o: o.perplexity(x["ppl_texts"])) for s, o in sides.items()},
    )
    seqs = pack_sequences(mlx.tok, [x["corpus"]], 128, args.collect_tokens)
    skip = np.array(sorted(special_ids(mlx.tok)), dtype=np.int32)
    n_col = int((~np.isin(seqs, skip)).sum())
    fns = {"mlxmerge": lambda: mlx.collect(corpus, args.collect_tokens, args.layer)}
    fns |= {
        s: (lambda o=o: o.collect(seqs.tolist(), args.layer, skip))
        for s, o in sides.items()
        if s != "mlxmerge"
    }
    row("sae collect (load included)", "tok/s", min(n_col, args.collect_tokens), fns, repeat=1)
    fns = {"mlxmerge": lambda: mlx.refusals(args.prompts, args.refusal_tokens)}
    fns |= {s: (lambda o=o: o.refusals(x["harmful"], x["harmless"], args.refusal_tokens))
            for s, o in sides.items() if s != "mlxmerge"}  # fmt: skip
    row(f"refusals, {args.prompts} prompts x {args.refusal_tokens} tokens (load included)", "s", 0,
        fns, repeat=1)  # fmt: skip
    if args.bf16_prompts:  # the before/after: the same verb, bf16 vs auto compute
        n = args.bf16_prompts
        row(f"refusals, {n} prompts x {args.refusal_tokens} tokens: bf16 compute (before)", "s", 0,
            {"mlxmerge": lambda: mlx16.refusals(n, args.refusal_tokens)}, repeat=1)  # fmt: skip
        row(f"refusals, {n} prompts x {args.refusal_tokens} tokens: auto compute (after)", "s", 0,
            {"mlxmerge": lambda: mlx.refusals(n, args.refusal_tokens)}, repeat=1)  # fmt: skip

    print("\nload (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t_load.items()))
    print(
        "\n| row | mlxmerge | transformers float32 | transformers bf16 | mlxmerge / best transformers |"
    )
    print("|---|---|---|---|---|")
    for name, res in rows.items():
        unit = units[name]
        hf = [res[s] for s in ("hf float32", "hf bfloat16") if s in res]
        if hf:
            best_hf = max(hf) if unit.endswith("/s") else min(hf)
            ratio = res["mlxmerge"] / best_hf if unit.endswith("/s") else best_hf / res["mlxmerge"]
            ratio_s = f"{ratio:.2f}x"
        else:
            ratio_s = ""
        cells = [
            f"{res[s]:.1f} {unit}" if s in res else ""
            for s in ("mlxmerge", "hf float32", "hf bfloat16")
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {ratio_s} |")
    a, b = rows["prefill"]["mlxmerge"], rows["prefill, mlxmerge bf16 compute"]["mlxmerge"]
    print(f"\nfloat32 compute vs bf16 compute (prefill): {a / b:.1f}x")


if __name__ == "__main__":
    main()
