"""The parity gate: an export's two graphs against the merged PyTorch model on held-out conversations.

Optimum's exporter only logs a warning on a mismatch and carries on, so lora-med gates on its own figures. The
reference is the merged model in fp32: its teacher-forced logits, and its greedy replies from transformers' ``generate()``
one prompt at a time (what a user of the plain model gets; the only ``generate()`` in the gate). Both
exported graphs make their replies through the engine (:mod:`lora_med.engine`), the loop every reply in
lora-med goes through:

* ``onnx/`` (Optimum's graph): teacher-forced logits (one forward pass per batch), held-out perplexity, and
  greedy replies through the engine's loop over ``ORTModelForCausalLM`` (the graph's cached path; batched
  rows left-padded);
* ``engine/`` (the decode graph): teacher-forced logits computed the way decoding computes them (the first
  token as a prompt, then one cached step per token), greedy replies one prompt at a time and all together.

fp32: logits within ``atol``, every greedy reply identical (single and batched), perplexity within
``ppl_rtol``. fp16 / int8 / int4: top-1 agreement >= ``min_top1``, logits within ``lossy_rtol`` x their
spread; the decode graph's replies identical on >= ``min_same_replies`` of the prompts (the Optimum graph's are
recorded). int4 has its own defaults (``config.GATE_INT4``: it drifts more than int8). Always: no NaN/inf.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import data, models
from ..cards import ExportCard, TrainCard
from ..config import ExportConfig
from ..engine import Engine, GenerationSettings, load_engine
from ..engine.ort_backend import ort_logits_fn, ort_model, session_options
from ..engine.torch_backend import optimum_engine
from ..errors import GateError
from ..perplexity import batches, perplexity, torch_logits_fn


def _prompts(conversations: list[data.Conversation], tokenizer, fmt: str, limit: int) -> list[list[int]]:
    """Each conversation up to its last user turn, formatted as in training (the app's prompt)."""
    out = []
    for conv in conversations:
        last_user = max(i for i, m in enumerate(conv.messages) if m.role == "user")
        out.append(data.prompt_ids(list(conv.messages[: last_user + 1]), tokenizer, fmt)[-limit:])
    return out


@torch.no_grad()
def _reference_greedy(model, prompts: list[list[int]], tokenizer, max_new_tokens: int) -> list[list[int]]:
    """The reference replies: transformers' ``generate()`` on each unpadded prompt, greedy, KV cache on, stopping
    at any of the model's end-of-reply ids (its generation config's). The id that ends a reply is dropped, as the
    engine drops it."""
    device = next(model.parameters()).device
    eos = models.stop_ids(model)
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        new = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(p) :].tolist()
        end = next((i for i, t in enumerate(new) if t in eos), len(new))
        out.append(new[:end])
    return out


def _reference_logits(logits_fn, examples: list[data.Example], pad: int, batch_size: int) -> list[torch.Tensor]:
    """float32 logits ``[len, vocab]`` of each example (right-padded batches, padding dropped)."""
    out = []
    for ids, mask, _ in batches(examples, batch_size, pad):
        logits = logits_fn(ids, mask)
        out += [logits[j, : int(mask[j].sum())] for j in range(len(ids))]
    return out


def _logit_figures(pairs, lossy: bool, cfg: ExportConfig) -> dict:
    """max / mean abs difference, NaN/inf count and top-1 agreement over (reference, exported) logit pairs."""
    max_diff, sum_diff, n_vals, nonfinite, agree, n_tok = 0.0, 0.0, 0, 0, 0, 0
    lo, hi = float("inf"), float("-inf")
    for ref, got in pairs:
        finite = torch.isfinite(got)
        nonfinite += int((~finite).sum())
        d = (got - ref).abs().where(finite, torch.tensor(float("inf")))
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d[finite].sum())
        n_vals += int(finite.sum())
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        n_tok += ref.shape[0]
        lo, hi = min(lo, float(ref.min())), max(hi, float(ref.max()))
    spread = hi - lo
    rtol = cfg.gate()["lossy_rtol"]
    return {
        "tokens": n_tok,
        "max_abs_diff": max_diff,
        "mean_abs_diff": sum_diff / max(n_vals, 1),
        "bound": rtol * spread if lossy else cfg.atol,
        "bound_kind": f"lossy_rtol {rtol} x logits spread" if lossy else "atol",
        "logits_spread": spread,
        "nonfinite": nonfinite,
        "top1_agreement": agree / max(n_tok, 1),
    }


def _greedy_figures(engine: Engine, prompts: list[list[int]], want: list[list[int]], max_new_tokens: int) -> dict:
    s = GenerationSettings(max_new_tokens=max_new_tokens)
    single = [engine.generate([p], s)[0] for p in prompts]
    batched = engine.generate(prompts, s)
    return {
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "through": engine.name,
        "identical_single": sum(a == b for a, b in zip(single, want)),
        "identical_batched": sum(a == b for a, b in zip(batched, want)),
    }


def _failures(f: dict, what: str, lossy: bool, cfg: ExportConfig, *, gate_replies: bool) -> list[str]:
    """What fails in one graph's figures, each line naming the graph."""
    out, g, n = [], f["greedy"], f["greedy"]["prompts"]
    gate = cfg.gate()
    if f["nonfinite"]:
        out.append(f"{what}: {f['nonfinite']} NaN/inf logits")
    if f["max_abs_diff"] > f["bound"]:
        out.append(
            f"{what}: teacher-forced logits max abs diff {f['max_abs_diff']:.3g} > {f['bound']:.3g} ({f['bound_kind']})"
        )
    if lossy:
        if f["top1_agreement"] < gate["min_top1"]:
            out.append(
                f"{what}: top-1 agreement {f['top1_agreement']:.2%} < {gate['min_top1']:.0%} ({f['tokens']} tokens)"
            )
        if gate_replies and g["identical_single"] < gate["min_same_replies"] * n:
            out.append(
                f"{what}: greedy replies identical to PyTorch fp32 on {g['identical_single']}/{n} prompts "
                f"< {gate['min_same_replies']:.0%}"
            )
    else:
        for key, how in (("identical_single", "one prompt at a time"), ("identical_batched", "batched")):
            if g[key] < n:
                out.append(f"{what}: greedy replies {how}: {g[key]}/{n} identical to PyTorch")
    return out


def check_parity(
    onnx_model,
    reference,
    tokenizer,
    conversations: list[data.Conversation],
    *,
    fmt: str,
    max_length: int,
    cfg: ExportConfig,
    engine: Engine | None = None,
    engine_note: str | None = None,
) -> dict:
    """The parity gate: the Optimum graph and the decode graph vs the merged PyTorch model (fp32).

    Args:
        onnx_model: an ORTModelForCausalLM (e.g. from ``engine_ort.ort_model``), or an export / onnx folder.
        reference: the merged PyTorch model (fp32).
        engine: the export's decode graph loaded with ``load_engine``; None when the export has none
            (``engine_note`` says why, recorded in the figures).
    Returns:
        The figures (``passed`` True): the Optimum graph's at the top level, the decode graph's under ``engine``.
    Raises:
        GateError: a check failed; the message lists every failure with its figures (``.figures`` holds them).
    """
    if isinstance(onnx_model, (str, Path)):
        onnx_model = ort_model(
            onnx_model,
            "CUDAExecutionProvider" if cfg.device == "cuda" else None,
            session_options=session_options(spin=False),
        )
    reference.eval()
    precision = cfg.precision()
    lossy = precision != "fp32"
    examples, _ = data.encode_all(conversations, tokenizer, max_length=max_length, fmt=fmt)
    pad, eos = tokenizer.pad_token_id, models.stop_ids(reference)
    ref_fn, ort_fn = torch_logits_fn(reference), ort_logits_fn(onnx_model)
    ref_logits = _reference_logits(ref_fn, examples, pad, cfg.batch_size)
    n_positions = models.max_positions(reference.config) or max_length + cfg.max_new_tokens
    prompts = _prompts(conversations, tokenizer, fmt, min(max_length, n_positions - cfg.max_new_tokens))
    want = _reference_greedy(reference, prompts, tokenizer, cfg.max_new_tokens)

    # onnx/: the Optimum graph
    onnx_figures = _logit_figures(zip(ref_logits, _reference_logits(ort_fn, examples, pad, cfg.batch_size)), lossy, cfg)
    ppl_ref = perplexity(ref_fn, examples, pad, cfg.batch_size)["assistant"]["ppl"]
    ppl_ort = perplexity(ort_fn, examples, pad, cfg.batch_size)["assistant"]["ppl"]
    onnx_figures["greedy"] = _greedy_figures(
        optimum_engine(onnx_model, eos_token_id=eos, precision=precision), prompts, want, cfg.max_new_tokens
    )
    onnx_figures["perplexity"] = {"pytorch": ppl_ref, "onnx": ppl_ort, "rel_diff": abs(ppl_ort - ppl_ref) / ppl_ref}
    failures = _failures(onnx_figures, "onnx/ (Optimum graph)", lossy, cfg, gate_replies=False)
    if not lossy and onnx_figures["perplexity"]["rel_diff"] > cfg.ppl_rtol:
        failures.append(
            f"onnx/ (Optimum graph): held-out perplexity {ppl_ort:.4f} vs PyTorch {ppl_ref:.4f}: "
            f"{onnx_figures['perplexity']['rel_diff']:.3%} apart (allowed {cfg.ppl_rtol:.1%})"
        )

    # engine/: the decode graph
    if engine is not None:
        cut = [e.input_ids[: engine.capacity] for e in examples]
        pairs = (
            (ref[: len(ids) - 1], torch.from_numpy(engine.teacher_forced_logits(ids)))
            for ref, ids in zip(ref_logits, cut)
            if len(ids) >= 2
        )
        engine_figures = {
            "status": "checked",
            "name": engine.name,
            "precision": engine.precision,
            **_logit_figures(pairs, lossy, cfg),
            "greedy": _greedy_figures(engine, prompts, want, cfg.max_new_tokens),
        }
        failures += _failures(engine_figures, "engine/ (decode graph)", lossy, cfg, gate_replies=True)
    else:
        engine_figures = {"status": "not built", "reason": engine_note or "no decode graph in this export"}

    figures = {
        "precision": precision,
        "reference": "merged PyTorch model, fp32 (replies: transformers generate())",
        "conversations": len(conversations),
        **onnx_figures,
        "engine": engine_figures,
        "passed": not failures,
        "failures": failures,
    }
    if failures:
        raise GateError(
            "parity gate failed (exported graphs vs PyTorch, "
            f"{len(conversations)} held-out conversations, {precision}):",
            failures,
            figures=figures,  # travel with the error to the manifest of the failed export
        )
    return figures


def print_parity(p: dict) -> None:
    if not p:
        return
    g, ppl = p["greedy"], p["perplexity"]
    print(
        f"      onnx/   logits: max abs diff {p['max_abs_diff']:.2e} (bound {p['bound']:.2e}) | top-1 "
        f"{p['top1_agreement']:.2%} of {p['tokens']} tokens | NaN/inf {p['nonfinite']} | perplexity "
        f"{ppl['onnx']:.4f} vs PyTorch {ppl['pytorch']:.4f} ({ppl['rel_diff']:.4%})"
    )
    print(
        f"              greedy {g['max_new_tokens']} tokens identical: single {g['identical_single']}/{g['prompts']}, "
        f"batched {g['identical_batched']}/{g['prompts']}"
    )
    e = p.get("engine") or {}
    if e.get("status") == "checked":
        g = e["greedy"]
        print(
            f"      engine/ logits: max abs diff {e['max_abs_diff']:.2e} (bound {e['bound']:.2e}) | top-1 "
            f"{e['top1_agreement']:.2%} of {e['tokens']} tokens | NaN/inf {e['nonfinite']}"
        )
        print(
            f"              greedy {g['max_new_tokens']} tokens identical: single {g['identical_single']}/"
            f"{g['prompts']}, batched {g['identical_batched']}/{g['prompts']}"
        )
    else:
        print(f"      engine/ not built: {e.get('reason')}")
    print(f"      -> {'PASS' if p['passed'] else 'FAIL'}")


def verify_export(export_dir: str | Path, provider: str | None = None) -> dict:
    """Run the parity gate again on an existing export (e.g. after copying it to another machine).

    Returns the figures; raises GateError as ``check_parity`` does, LoraMedError if the folder is not
    a complete export or its run folder is gone.
    """
    d = Path(export_dir)
    manifest = ExportCard.read(d)
    cfg = manifest.options
    card = TrainCard.read(manifest.source.run_dir)
    device = models.resolve_device(cfg.device)
    reference = models.load_model(str(d / "merged"), trust_remote_code=cfg.trust_remote_code).to(device)
    tokenizer = models.load_tokenizer(str(d / "merged"), trust_remote_code=cfg.trust_remote_code)
    onnx_model = ort_model(
        d,
        provider or ("CUDAExecutionProvider" if device == "cuda" else None),
        session_options=session_options(spin=False),
    )
    graph = manifest.engine
    engine = load_engine(d / "engine", device=graph.device, spin=False) if graph.device is not None else None
    try:
        return check_parity(
            onnx_model,
            reference,
            tokenizer,
            card.held_out()[: cfg.n_parity],
            fmt=card.format,
            max_length=card.max_length,
            cfg=cfg,
            engine=engine,
            engine_note=graph.reason,
        )
    finally:
        if engine is not None:
            engine.close()
