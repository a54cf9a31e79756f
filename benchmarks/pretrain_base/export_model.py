"""Copy the final checkpoint into models/gpt2-es-tiny/ as a stock-transformers folder.

- weights: model.safetensors in float16. The tied fp32 weights are ~28 MB (7.0M params),
  above the ~20 MB budget for a file committed to git; fp16 halves it and
  from_pretrained() upcasts to fp32 by default, so users train/run in fp32 as before.
- config: dropout set back to GPT-2's 0.1 (pretraining used 0.0, see pretrain.py) so that
  downstream fine-tuning behaves like DialoGPT/GPT-2.
- generation_config: bos = eos = pad = the "<|endoftext|>" id, as DialoGPT.

Usage:  python export_model.py --work-dir /tmp/pretrain_base [--out models/gpt2-es-tiny]
"""

import argparse
import os

import torch
from transformers import GenerationConfig, GPT2LMHeadModel, GPT2TokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.normpath(os.path.join(HERE, "..", "..", "models", "gpt2-es-tiny"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/tmp/pretrain_base")
    ap.add_argument("--run-name", default="run")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    src = os.path.join(args.work_dir, args.run_name, "final")
    model = GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32)
    tok = GPT2TokenizerFast.from_pretrained(src)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    cfg = model.config
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.1
    eos = tok.eos_token_id
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = eos
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model.half()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)  # model.safetensors only
    tok.save_pretrained(args.out)
    tok.backend_tokenizer.model.save(args.out)  # vocab.json + merges.txt (slow-tokenizer files)
    total = 0
    for f in sorted(os.listdir(args.out)):
        size = os.path.getsize(os.path.join(args.out, f))
        total += size
        print(f"{size:>10,}  {f}")
    print(f"{total:>10,}  total")


if __name__ == "__main__":
    main()
