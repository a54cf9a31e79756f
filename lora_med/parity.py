"""The parity gate: an export's ONNX graph against the merged PyTorch model on held-out conversations.

Optimum itself only warns on a mismatch (FACTS.md), so lora-med gates on its own figures:

* fp32: teacher-forced logits within ``atol``, greedy replies identical with the KV cache and batched
  with left padding, held-out perplexity within ``ppl_rtol``;
* fp16 / int8: top-1 agreement >= ``min_top1`` and the logits' difference within ``lossy_rtol`` x
  their spread; replies and perplexity recorded;
* always: no NaN/inf.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import chat, data, models, runs
from .config import ExportConfig
from .errors import GateError
from .evaluate import batches, perplexity, torch_logits_fn
from .ort import ort_logits_fn, ort_model, quiet_session_options


def _prompts(conversations: list[data.Conversation], tokenizer, fmt: str, limit: int) -> list[list[int]]:
    """Each conversation up to its last user turn, formatted as in training (the app's prompt)."""
    out = []
    for conv in conversations:
        last_user = max(i for i, m in enumerate(conv.messages) if m.role == "user")
        out.append(chat.prompt_ids(list(conv.messages[: last_user + 1]), tokenizer, fmt)[-limit:])
    return out


@torch.no_grad()
def _greedy(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, device) -> tuple[list, list]:
    """Greedy continuations: one prompt at a time (KV cache), then all together left-padded."""
    from transformers.utils import logging as hf_logging

    # Prompts end with EOS, which is also the pad token: generate() would warn of "right-padding".
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _greedy_runs(model, prompts, tokenizer, max_new_tokens, device)
    finally:
        hf_logging.set_verbosity(verbosity)


def _greedy_runs(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, device) -> tuple[list, list]:
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    single = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        single.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0, len(p):].tolist())
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as a batched chat server pads
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)[:, width:]
    return single, out.tolist()


def check_parity(onnx_model, reference, tokenizer, conversations: list[data.Conversation], *, fmt: str,
                 max_length: int, cfg: ExportConfig) -> dict:
    """The parity gate: ONNX vs the merged PyTorch model (fp32) on held-out conversations.

    fp32: teacher-forced logits max abs diff <= cfg.atol, greedy replies identical (cached and
    batched with left padding), perplexity within cfg.ppl_rtol. fp16/int8: top-1 agreement >=
    cfg.min_top1 and max diff <= cfg.lossy_rtol x the logits' spread; replies and perplexity recorded.
    Always: no NaN/inf.

    Args:
        onnx_model: an ORTModelForCausalLM (e.g. from ``ort_model``), or an export / onnx folder.
    Returns:
        The figures (``passed`` True).
    Raises:
        GateError: a check failed; the message lists every failure with its figures.
    """
    if isinstance(onnx_model, (str, Path)):
        onnx_model = ort_model(onnx_model, "CUDAExecutionProvider" if cfg.device == "cuda" else None,
                               session_options=quiet_session_options())
    reference.eval()
    precision = cfg.precision()
    lossy = precision != "fp32"
    examples, _ = data.encode_all(conversations, tokenizer, max_length=max_length, fmt=fmt)
    pad = tokenizer.pad_token_id
    ref_fn, ort_fn = torch_logits_fn(reference), ort_logits_fn(onnx_model)

    max_diff, sum_diff, n_vals, nonfinite, agree, n_tok = 0.0, 0.0, 0, 0, 0, 0
    lo, hi = float("inf"), float("-inf")
    for ids, mask, _ in batches(examples, cfg.batch_size, pad):
        keep = mask.bool()
        ref, got = ref_fn(ids, mask)[keep], ort_fn(ids, mask)[keep]
        finite = torch.isfinite(got)
        nonfinite += int((~finite).sum())
        d = (got - ref).abs().where(finite, torch.tensor(float("inf")))
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d[finite].sum())
        n_vals += int(finite.sum())
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        n_tok += int(keep.sum())
        lo, hi = min(lo, float(ref.min())), max(hi, float(ref.max()))
    top1 = agree / max(n_tok, 1)
    spread = hi - lo
    bound = cfg.lossy_rtol * spread if lossy else cfg.atol

    ppl_ref = perplexity(ref_fn, examples, pad, cfg.batch_size)["assistant"]["ppl"]
    ppl_ort = perplexity(ort_fn, examples, pad, cfg.batch_size)["assistant"]["ppl"]
    ppl_rel = abs(ppl_ort - ppl_ref) / ppl_ref

    prompts = _prompts(conversations, tokenizer, fmt, max_length)
    ref_single, ref_batch = _greedy(reference, prompts, tokenizer, cfg.max_new_tokens,
                                    next(reference.parameters()).device)
    ort_single, ort_batch = _greedy(onnx_model, prompts, tokenizer, cfg.max_new_tokens, onnx_model.device)
    same_single = sum(a == b for a, b in zip(ref_single, ort_single))
    same_batch = sum(a == b for a, b in zip(ref_batch, ort_batch))

    figures = {
        "precision": precision, "reference": "merged PyTorch model, fp32", "conversations": len(conversations),
        "tokens": n_tok, "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / max(n_vals, 1),
        "bound": bound, "bound_kind": f"lossy_rtol {cfg.lossy_rtol} x logits spread" if lossy else "atol",
        "logits_spread": spread, "nonfinite": nonfinite, "top1_agreement": top1,
        "greedy": {"prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
                   "identical_cached": same_single, "identical_batched_left_padded": same_batch},
        "perplexity": {"pytorch": ppl_ref, "onnx": ppl_ort, "rel_diff": ppl_rel},
    }
    failures = []
    if nonfinite:
        failures.append(f"{nonfinite} NaN/inf logits")
    if max_diff > bound:
        failures.append(f"teacher-forced logits max abs diff {max_diff:.3g} > {bound:.3g} ({figures['bound_kind']})")
    if lossy and top1 < cfg.min_top1:
        failures.append(f"top-1 agreement {top1:.2%} < {cfg.min_top1:.0%} ({n_tok} tokens)")
    if not lossy:
        if same_single < len(prompts):
            failures.append(f"greedy replies with the KV cache: {same_single}/{len(prompts)} identical to PyTorch")
        if same_batch < len(prompts):
            failures.append(f"greedy replies batched with left padding: {same_batch}/{len(prompts)} identical")
        if ppl_rel > cfg.ppl_rtol:
            failures.append(f"held-out perplexity {ppl_ort:.4f} vs PyTorch {ppl_ref:.4f}: {ppl_rel:.3%} apart "
                            f"(allowed {cfg.ppl_rtol:.1%})")
    figures["passed"], figures["failures"] = not failures, failures
    if failures:
        err = GateError("parity gate failed (ONNX vs PyTorch, "
                        f"{len(conversations)} held-out conversations, {precision}):", failures)
        err.figures = figures  # travel with the error to the manifest of the failed export
        raise err
    return figures


def print_parity(p: dict) -> None:
    if not p:
        return
    g, ppl = p["greedy"], p["perplexity"]
    print(f"      logits: max abs diff {p['max_abs_diff']:.2e} (bound {p['bound']:.2e}) | top-1 "
          f"{p['top1_agreement']:.2%} of {p['tokens']} tokens | NaN/inf {p['nonfinite']}")
    print(f"      greedy {g['max_new_tokens']} tokens identical: cached {g['identical_cached']}/{g['prompts']}, "
          f"batched left-padded {g['identical_batched_left_padded']}/{g['prompts']}")
    print(f"      perplexity: ONNX {ppl['onnx']:.4f} vs PyTorch {ppl['pytorch']:.4f} ({ppl['rel_diff']:.4%})"
          f" -> {'PASS' if p['passed'] else 'FAIL'}")


def verify_export(export_dir: str | Path, provider: str | None = None) -> dict:
    """Run the parity gate again on an existing export (e.g. after copying it to another machine).

    Returns the figures; raises GateError as ``check_parity`` does, LoraMedError if the folder is not
    a complete export or its run folder is gone.
    """
    d = Path(export_dir)
    manifest = runs.load_card(d, "export")
    cfg = ExportConfig(**{k: v for k, v in manifest["options"].items() if k in ExportConfig.__dataclass_fields__})
    run_dir = Path(manifest["source"]["run_dir"])
    card = runs.load_card(run_dir, "train")
    device = models.resolve_device(cfg.device)
    reference = models.load_model(str(d / "merged"), trust_remote_code=cfg.trust_remote_code).to(device)
    tokenizer = models.load_tokenizer(str(d / "merged"), trust_remote_code=cfg.trust_remote_code)
    onnx_model = ort_model(d, provider or ("CUDAExecutionProvider" if device == "cuda" else None),
                           session_options=quiet_session_options())
    return check_parity(onnx_model, reference, tokenizer, runs.held_out(card, run_dir)[: cfg.n_parity],
                        fmt=card["data"]["format"], max_length=card["data"]["max_length"], cfg=cfg)
