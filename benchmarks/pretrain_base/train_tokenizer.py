"""Train a byte-level BPE tokenizer (vocab 8192) on the training split of the corpus.

Byte-level like GPT-2/DialoGPT, so any text (accents, ñ, ¿¡, emoji) encodes without
<unk>. The single special token "<|endoftext|>" is bos = eos = unk = pad, exactly as in
GPT-2/DialoGPT, and ends every dialogue turn. The folder is saved through
transformers.GPT2TokenizerFast so AutoTokenizer loads it offline with no custom code.

Usage:  python train_tokenizer.py --work-dir /tmp/pretrain_base
        (writes <work-dir>/tokenizer/)
"""

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2TokenizerFast

EOS = "<|endoftext|>"
VOCAB_SIZE = 8192
N_POSITIONS = 512  # must equal the model's n_positions (model_max_length)


def texts(path):
    """Every training string: prose documents and every dialogue turn."""
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if "text" in d:
                yield d["text"]
            else:
                yield from d["turns"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/tmp/pretrain_base")
    args = ap.parse_args()

    tok = Tokenizer(models.BPE())
    # Same pipeline as GPT-2's tokenizer.json: no prefix space, byte-level decoding.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator(texts(os.path.join(args.work_dir, "corpus", "train.jsonl")), trainer)

    hf = GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=N_POSITIONS,
        add_prefix_space=False,
    )
    out = os.path.join(args.work_dir, "tokenizer")
    hf.save_pretrained(out)
    # GPT2TokenizerFast writes vocab.json/merges.txt only when it has a slow-tokenizer
    # source file; write them from the BPE model so the slow GPT2Tokenizer can load too.
    tok.model.save(out)
    print(f"vocab {hf.vocab_size} (+{len(hf) - hf.vocab_size} added), eos id {hf.eos_token_id}")
    s = "El niño pidió cita en la clínica: ¿mañana a las diez?"
    ids = hf(s)["input_ids"]
    print(len(s), "chars ->", len(ids), "tokens:", hf.convert_ids_to_tokens(ids))
    assert hf.decode(ids) == s


if __name__ == "__main__":
    main()
