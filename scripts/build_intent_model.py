"""Rebuild the intent layer's learned model (configs/intents-model.safetensors) from the blind rounds' labels.

    .venv/bin/python scripts/build_intent_model.py            # write the model, print its sha256 and held-out figures
    .venv/bin/python scripts/build_intent_model.py --pin      # ... and pin that sha256 in configs/intents.yaml
    .venv/bin/python scripts/build_intent_model.py --out X    # write elsewhere (the shipped file is untouched)

Deterministic: the same messages give the same bytes (tests/test_intent_model.py rebuilds it and compares).
Sources and the choice of model: lora_med/serve/intent_model.py.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lora_med.serve.intent_model import build  # noqa: E402
from lora_med.serve.intents import Intents  # noqa: E402

SHIPPED = REPO / "configs" / "intents-model.safetensors"
RULES = REPO / "configs" / "intents.yaml"
PIN = re.compile(r"^(learned: \{file: intents-model\.safetensors, sha256: )([0-9a-f]{64}|pending)(\})$", re.M)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=SHIPPED, help="model file to write [default: the shipped one]")
    ap.add_argument("--pin", action="store_true", help="write the new sha256 into configs/intents.yaml")
    args = ap.parse_args(argv)
    if not args.out.parent.is_dir():
        print(f"error: --out {args.out}: folder {args.out.parent} does not exist; create it first", file=sys.stderr)
        return 2
    if args.pin and args.out.resolve() != SHIPPED.resolve():
        print("error: --pin pins the shipped model only; drop --out or --pin", file=sys.stderr)
        return 2
    text = RULES.read_text(encoding="utf-8")
    if args.pin and not PIN.search(text):
        print(
            f"error: {RULES}: no `learned: {{file: intents-model.safetensors, sha256: ...}}` line to pin",
            file=sys.stderr,
        )
        return 2
    rules = Intents(RULES, learned=False)  # the rules alone, for the figure beside the model's
    sha, meta = build(REPO, args.out, rules.intent)
    h = meta["held_out"]
    print(f"wrote {args.out} sha256 {sha}")
    print(f"trained on {sum(meta['trained_on'].values())} messages: {meta['trained_on']}")
    print(
        f"held out ({h['rounds'][0]} to {h['rounds'][-1]}, {h['messages']} requests, each round scored by a model "
        f"trained on the others): model {100 * h['model']:.1f}%, rules {100 * h['rules']:.1f}%"
    )
    for want, got in h["confusion"].items():
        print(f"  {want}: {got}")
    if args.pin:
        RULES.write_text(PIN.sub(lambda m: m.group(1) + sha + m.group(3), text), encoding="utf-8")
        print(f"pinned in {RULES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
