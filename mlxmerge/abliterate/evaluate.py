"""``refusals``: refusal rate, false refusals, first-token KL and perplexity of one model (or two)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlxmerge.abliterate.prompts import bundled_prompts
from mlxmerge.eval.divergence import perplexity
from mlxmerge.eval.judge import agreement
from mlxmerge.eval.prompts import read_prompts
from mlxmerge.eval.refusal import REFUSAL_MARKERS, is_refusal, rate_summary
from mlxmerge.io import open_checkpoint
from mlxmerge.io.documents import read_documents
from mlxmerge.lm.chat import chat_tokens, check_chat_template, pad_token_id
from mlxmerge.lm.generate import last_logits
from mlxmerge.lm.logprobs import kl_divergence

Progress = Callable[[str, int, int], None]


def refusals(
    model: str | Path, *, compare: str | Path | None = None, harmful: str | Path | None = None,
    harmless: str | Path | None = None, column: str | None = None, max_tokens: int = 100,
    batch_size: int = 16, markers: tuple[str, ...] = REFUSAL_MARKERS, system: str | None = None,
    template: str | None = None, text: str | Path | None = None, limit: int | None = None,
    answers: int = 0, judge: str | Path | None = None, progress: Progress | None = None,
) -> dict:  # fmt: skip
    """Evaluate ``model`` (and ``compare``) on harmful and harmless prompts.

    Default prompts are the bundled held-out test splits; a user file is used whole. Each rate
    comes with its count and 95% Wilson interval (``refusal``: ``{rate, k, n, ci95}``). With
    ``compare``, also the first-token KL(compare ‖ model) and the share of identical harmless
    answers. ``answers`` N > 0 adds the first N prompts of each set with the model's answer and
    the judge's verdict (``answers``: ``{"harmful": [{prompt, answer, refusal}], ...}``).
    ``judge``: a local chat model also judges every answer (``mlxmerge.eval.judge``); its rates
    and its agreement with the marker judge go in ``judge``, its verdicts beside the markers'.
    """
    from mlxmerge.abliterate.pipeline import _tick, answer_texts
    from mlxmerge.lm.load import load

    refs = [model] + ([compare] if compare else [])
    for ref in refs + ([judge] if judge else []):
        open_checkpoint(ref)  # validates before the slow load
    harm = read_prompts(harmful, column) if harmful else bundled_prompts("harmful", "test")
    good = read_prompts(harmless, column) if harmless else bundled_prompts("harmless", "test")
    if limit:
        harm, good = harm[:limit], good[:limit]
    texts = read_documents(text) if text else None
    out: dict = {"max_tokens": max_tokens, "n_harmful": len(harm), "n_harmless": len(good),
                 "models": {}}  # fmt: skip
    harmless_answers, logits = {}, {}
    for ref in refs:
        net, tok = load(open_checkpoint(ref), verb="refusals")  # base+adapter: adapter applied
        check_chat_template(tok, template)
        ht = chat_tokens(tok, harm, system=system, chat_template=template)
        gt = chat_tokens(tok, good, system=system, chat_template=template)
        a_h = answer_texts(net, tok, ht, max_tokens=max_tokens, batch_size=batch_size,
                           progress=progress, stage=f"{Path(str(ref)).name}: harmful")  # fmt: skip
        a_g = answer_texts(net, tok, gt, max_tokens=max_tokens, batch_size=batch_size,
                           progress=progress, stage=f"{Path(str(ref)).name}: harmless")  # fmt: skip
        v_h, v_g = [is_refusal(a, markers) for a in a_h], [is_refusal(a, markers) for a in a_g]
        bad, good_rate = rate_summary(v_h), rate_summary(v_g)
        row = {
            "refusal_rate": bad["rate"], "refusal": bad,
            "harmless_refusal_rate": good_rate["rate"], "harmless_refusal": good_rate,
        }  # fmt: skip
        j_h = j_g = None
        if judge:
            if isinstance(judge, (str, Path)):
                from mlxmerge.eval.judge import ModelJudge

                judge = ModelJudge(judge, batch_size=batch_size)
            j_h = judge.scores(harm, a_h, progress=_tick(progress, "judge: harmful", len(harm)))
            j_g = judge.scores(good, a_g, progress=_tick(progress, "judge: harmless", len(good)))
            row["judge"] = {
                "model": judge.name,
                "refusal": rate_summary(j_h > 0.5),
                "harmless_refusal": rate_summary(j_g > 0.5),
                "agreement_with_markers": agreement(list(j_h > 0.5) + list(j_g > 0.5), v_h + v_g),
            }
        if answers:
            row["answers"] = {
                kind: [{"prompt": p, "answer": a, "refusal": v}
                       | ({} if js is None else {"judge": bool(js[i] > 0.5), "judge_p_yes": float(js[i])})
                       for i, (p, a, v) in enumerate(list(zip(prompts, texts_, verdicts))[:answers])]
                for kind, prompts, texts_, verdicts, js in (("harmful", harm, a_h, v_h, j_h),
                                                            ("harmless", good, a_g, v_g, j_g))
            }  # fmt: skip
        if texts:
            row["perplexity"] = perplexity(net, tok, texts, batch_size=batch_size,
                                           progress=_tick(progress, "perplexity", len(texts)))  # fmt: skip
        harmless_answers[str(ref)] = a_g
        logits[str(ref)] = last_logits(net, gt, pad_id=pad_token_id(tok), batch_size=batch_size)
        out["models"][str(ref)] = row
    if compare:
        base, new = str(compare), str(model)
        out["models"][new]["kl_vs_compare"] = kl_divergence(logits[base], logits[new]).mean().item()
        same = sum(a == b for a, b in zip(harmless_answers[base], harmless_answers[new]))
        out["models"][new]["same_harmless_answers"] = same / len(good)
    return out
