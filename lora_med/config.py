"""The settings of every command, declared once (see ``settings.py`` for how they become flags, YAML
keys and checks). Light on purpose: ``lora-med --help`` imports this module and nothing heavy.

Defaults live here and only here. A field's help is its ``--help`` line; its type (a ``Literal[...]`` names the
choices) and ``min``/``max``/... are checked by ``settings.check`` for flags, YAML and Python alike; ``aliases``
are the Hugging Face argument names users already know (``--num_train_epochs``, ``--lora_r``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from .settings import setting

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = "models/gpt2-es-tiny"  # the shipped pretrained Spanish base (models/gpt2-es-tiny/README.md)
DEFAULT_DATA = "data/medical_conversations.json"
DEFAULT_EVAL = "data/medical_conversations_eval.json"
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_INTENTS = "configs/intents.yaml"
DEFAULT_EMERGENCY = "configs/triage.yaml"
DEFAULT_FACTS = "configs/clinic.yaml"
DEFAULT_REPLIES = "configs/replies.yaml"

# The choices of settings, as types: a field typed with one accepts exactly these values (settings.check).
Method = Literal["lora", "qlora", "full"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
Format = Literal["auto", "dialogpt", "chat-template"]
Device = Literal["auto", "cpu", "cuda"]
ReportTo = Literal["tensorboard", "wandb", "mlflow", "none"]
Attention = Literal["auto", "sdpa", "eager"]
Optimizer = Literal["auto", "adamw", "adamw_8bit"]
TrainOn = Literal["assistant", "all"]
TrainTokens = Literal["none", "data"]
QuantBits = Literal[4, 8]
METHODS: tuple[str, ...] = get_args(Method)
FORMATS: tuple[str, ...] = get_args(Format)
# The lossy (fp16/int8) export gate, shared by merge-export and bench --paired.
GATE_MIN_TOP1 = 0.99  # top-1 token agreement with PyTorch fp32
GATE_MIN_SAME_REPLIES = 0.95  # share of greedy replies identical to PyTorch fp32
GATE_LOSSY_RTOL = 0.1  # max abs logits difference as a share of the logits' spread
# int4's own gate. Round-to-nearest 4-bit weights drift more than int8: on the shipped gpt2-es-tiny (64 held-out
# conversations, 5,844 teacher-forced tokens, decode graph vs PyTorch fp32) int8 agrees on 99.3% of top-1 tokens
# and 56/64 greedy 32-token replies, int4 (block 32) on 92.9% and 9/64, its largest logit difference 6.6% of the
# spread. A reply of a few dozen tokens diverges somewhere under int4, so identical replies are recorded, not
# gated; top-1 agreement and the logit bound are.
GATE_INT4 = {"min_top1": 0.90, "min_same_replies": 0.0, "lossy_rtol": GATE_LOSSY_RTOL}
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 5e-5}  # full: the seed guide's 5e-5
LARGEST_GPU_GB = 288  # the most memory one GPU sold has (AMD Instinct MI355X, NVIDIA B300: 288 GB)


def _vram_unit_hint(gb: float) -> str | None:
    """What a --vram-gb figure beyond any GPU probably is: MiB (nvidia-smi's unit) or bytes."""
    if 1024 <= gb <= LARGEST_GPU_GB * 1024:
        return f"{gb:g} looks like MiB (nvidia-smi's unit): that is {gb / 1024:.3g} GB; give {gb / 1024:.3g}"
    if 1e8 <= gb <= LARGEST_GPU_GB * 1e9:
        return f"{gb:g} looks like bytes: that is {gb / 1e9:.3g} GB; give {gb / 1e9:.3g}"
    return None


def shipped(path: str) -> Path:
    """A path as given, or, when it is one of the shipped defaults and not found from here, the checkout's copy:
    so `lora-med train` works from any directory."""
    p = Path(path).expanduser()
    if (
        not p.exists()
        and not p.is_absolute()
        and path
        in (
            DEFAULT_BASE,
            DEFAULT_DATA,
            DEFAULT_EVAL,
            DEFAULT_INTENTS,
            DEFAULT_EMERGENCY,
            DEFAULT_FACTS,
            DEFAULT_REPLIES,
        )
    ):
        return REPO_ROOT / path
    return p


@dataclass
class TrainConfig:
    """Settings of ``lora-med train`` (also the keys of its ``--config`` YAML)."""

    # data
    data: str = setting(DEFAULT_DATA, "training conversations (.json array or .jsonl)")
    eval_data: str | None = setting(
        "auto",
        "held-out conversations: a file; auto: the shipped eval file with the shipped data, else a "
        "seeded split of --data; split: always a seeded split (see --eval-fraction)",
        aliases=("--eval_data",),
    )
    eval_fraction: float | None = setting(
        None,
        f"share of --data held out when there is no eval file [default: {DEFAULT_EVAL_FRACTION}]",
        above=0,
        below=1,
    )
    allow_eval_overlap: bool = setting(
        False,
        "evaluate even on conversations that are also in --data (refused by default: such figures are not "
        "held-out; the card and every report then say so)",
    )
    max_length: int = setting(256, "tokens per conversation; longer ones lose their oldest turns", min=8)
    format: Format = setting(
        "auto",
        "auto: the tokenizer's chat template if it has one, else DialoGPT's (each turn ends with EOS)",
    )
    train_on: TrainOn = setting(
        "assistant",
        "assistant: loss on the replies and the EOS ending each; all: every token",
    )
    # model
    base: str = setting(
        DEFAULT_BASE,
        "base model: a local folder or a hub id (e.g. microsoft/DialoGPT-medium)",
        aliases=("--model_name_or_path",),
    )
    trust_remote_code: bool = setting(False, "run code shipped with the base model (only for bases you trust)")
    # method
    method: Method = setting("lora", "lora, qlora (bitsandbytes 4/8-bit base) or full (the baseline)")
    r: int = setting(8, "LoRA rank", min=1, aliases=("--lora_r",))
    alpha: int = setting(16, "LoRA alpha (scale = alpha / r)", min=1, aliases=("--lora_alpha",))
    dropout: float = setting(0.05, "LoRA dropout", min=0, below=1, aliases=("--lora_dropout",))
    target_modules: list[str] | None = setting(
        None,
        "layers LoRA adapts (comma-separated); default per architecture (GPT-2: c_attn,c_proj,c_fc); "
        "lm_head and embeddings are never targets",
    )
    quant_bits: QuantBits = setting(4, "QLoRA: 4 (NF4, double quant) or 8")
    train_tokens: TrainTokens = setting(
        "none",
        "data: also train the embedding rows (tied lm_head too) of the tokens the training data uses",
    )
    # optimisation
    epochs: float = setting(3.0, "passes over the training data", above=0, aliases=("--num_train_epochs",))
    batch_size: int = setting(
        4, "conversations per step (per device)", min=1, aliases=("--per_device_train_batch_size",)
    )
    grad_accum: int = setting(
        1,
        "micro-batches per optimizer step",
        min=1,
        aliases=("--gradient_accumulation_steps", "--gradient-accumulation"),
    )
    learning_rate: float | None = setting(
        None, "peak learning rate [default: 2e-4 for LoRA/QLoRA, 5e-5 for full]", above=0
    )
    scheduler: Scheduler = setting("linear", "learning-rate schedule", aliases=("--lr_scheduler_type",))
    warmup_ratio: float = setting(0.05, "share of the steps spent warming up", min=0, below=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above=0)
    max_steps: int = setting(-1, "> 0: stop after this many optimizer steps (overrides --epochs)", min=-1)
    seed: int = setting(42, "seed of data order, split, dropout and initialisation", min=0)
    precision: Precision = setting("auto", "auto: bf16 (or fp16) on CUDA, fp32 on the CPU")
    device: Device = setting("auto", "where to train")
    # memory: the levers (lora_med/levers.py). Unset: off, unless --vram-gb needs them to fit; --no-X rules X out.
    vram_gb: float | None = setting(
        None,
        "plan for this memory budget (a card's GB): the fastest micro-batch and "
        "levers that fit (grad-accum keeps the effective batch)",
        above=0,
        max=LARGEST_GPU_GB,
        hint=_vram_unit_hint,
    )
    gradient_checkpointing: bool | None = setting(
        None, "recompute activations in the backward pass (less memory; +28% compute at DialoGPT-medium's shape)"
    )
    attention: Attention = setting(
        "auto",
        "sdpa: fused attention, no score matrices kept; eager: transformers' own (keeps "
        "them); auto: sdpa where the model has it",
    )
    chunked_ce: bool | None = setting(
        None,
        "compute the loss --loss-chunk tokens at a time, recomputed in the "
        "backward, so the full-vocabulary fp32 logits never exist (+5% compute)",
    )
    loss_chunk: int = setting(256, "tokens per chunk of --chunked-ce", min=1)
    optim: Optimizer = setting(
        "auto",
        "adamw (torch) or adamw_8bit (bitsandbytes' 8-bit states; full fine-tune only); "
        "auto: adamw, or adamw_8bit when --vram-gb needs it",
    )
    # logging and checkpoints
    log_every: int = setting(50, "steps between log lines (the seed's 50)", min=1, aliases=("--logging_steps",))
    eval_every: int | None = setting(
        None, "steps between held-out evaluations [default: every epoch]", min=1, aliases=("--eval_steps",)
    )
    save_every: int | None = setting(
        None, "steps between checkpoints [default: every epoch]", min=1, aliases=("--save_steps",)
    )
    report_to: list[ReportTo] = setting(
        ["tensorboard"], "where metrics go: tensorboard, wandb, mlflow or none (installed ones)"
    )
    output: str | None = setting(None, "run folder [default: adapters/<run name>]", aliases=("--output_dir",))
    run_name: str | None = setting(None, "run name [default: <method>-<base name>]")
    resume: str | None = setting(
        None,
        "continue an interrupted run: the --output folder, or RUN_DIR",
        aliases=("--resume_from_checkpoint",),
        metavar="[RUN_DIR]",
        click=dict(is_flag=False, flag_value="auto"),
    )
    overwrite: bool = setting(False, "replace a finished or interrupted run in --output (only a folder lora-med wrote)")
    compare: bool = setting(True, "base vs fine-tuned replies for the fixed Spanish prompts, as the seed guide")
    compare_max_new_tokens: int = setting(40, "new tokens per comparison reply", min=1)

    def resolved_lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR.get(self.method, 2e-4)

    def output_dir(self) -> Path:
        if self.resume and self.resume != "auto":
            return Path(self.resume)
        if self.output:
            return Path(self.output)
        name = self.run_name or f"{self.method}-{Path(self.base.rstrip('/')).name}"
        return Path("adapters") / name


ExportDevice = Literal["cpu", "cuda"]
ExportDtype = Literal["fp32", "fp16"]
Optimize = Literal["none", "O1", "O2", "O3", "O4"]
Quantize = Literal["none", "int8", "int4"]


@dataclass
class ExportConfig:
    """Settings of ``lora-med merge-export`` (also the keys of its ``--config`` YAML)."""

    run_dir: str = setting("", "a `lora-med train` run folder (adapter or full model)", hidden=True)
    output: str | None = setting(None, "export folder [default: exports/<run name>-<device>-<dtype>[-int8]]")
    device: ExportDevice = setting(
        "cpu",
        "cpu, or cuda (CUDAExecutionProvider with IO binding; the engine's fp16 decode graph)",
    )
    dtype: ExportDtype = setting(
        "fp32",
        "fp32, or fp16 (needs --device cuda): both graphs, fp16 converted from the fp32 export",
    )
    optimize: Optimize = setting(
        "none",
        "ONNX Runtime graph optimisation of the Optimum graph (O4 = O3 + fp16, CUDA only)",
    )
    quantize: Quantize = setting(
        "none",
        "int8: dynamic int8 for the CPU provider (one recipe for both graphs: MatMul "
        "weights per channel, embeddings float); int4: 4-bit MatMul weights for the CPU (MatMulNBits, "
        "block 32; a tied head's int4 weight also serves the embedding), behind its own looser gate",
    )
    atol: float = setting(1e-4, "fp32 gate: max abs difference of teacher-forced logits, ONNX vs PyTorch", above=0)
    ppl_rtol: float = setting(0.005, "fp32 gate: relative difference of held-out perplexity", above=0)
    min_top1: float | None = setting(
        None,
        f"fp16/int8/int4 gate: top-1 token agreement with PyTorch fp32 [default: {GATE_MIN_TOP1}; int4: "
        f"{GATE_INT4['min_top1']}]",
        above=0,
        max=1,
    )
    lossy_rtol: float | None = setting(
        None,
        f"fp16/int8/int4 gate: max abs logits difference as a share of the logits' spread [default: {GATE_LOSSY_RTOL}]",
        above=0,
    )
    min_same_replies: float | None = setting(
        None,
        "fp16/int8/int4 gate: share of the decode graph's greedy replies identical to PyTorch fp32 "
        f"[default: {GATE_MIN_SAME_REPLIES}; int4: {GATE_INT4['min_same_replies']}, recorded only]",
        min=0,
        max=1,
    )
    max_new_tokens: int = setting(32, "greedy reply length compared with PyTorch", min=1)
    n_parity: int = setting(8, "held-out conversations used by the merge check and the gate", min=1)
    batch_size: int = setting(8, "conversations per forward pass in the checks", min=1)
    trust_remote_code: bool = setting(False, "run code shipped with the base model (only for bases you trust)")
    overwrite: bool = setting(False, "replace an export at --output (only a folder lora-med wrote)")

    def precision(self) -> str:
        """What the ONNX graph computes in: fp32, fp16, int8 or int4."""
        if self.quantize in ("int8", "int4"):
            return self.quantize
        return "fp16" if self.dtype == "fp16" or self.optimize == "O4" else "fp32"

    def gate(self) -> dict:
        """The lossy gate's thresholds for this precision: the settings given, else the declared defaults."""
        defaults = (
            GATE_INT4
            if self.precision() == "int4"
            else {"min_top1": GATE_MIN_TOP1, "min_same_replies": GATE_MIN_SAME_REPLIES, "lossy_rtol": GATE_LOSSY_RTOL}
        )
        return {k: getattr(self, k) if getattr(self, k) is not None else v for k, v in defaults.items()}

    def output_dir(self) -> Path:
        if self.output:
            return Path(self.output)
        name = f"{Path(self.run_dir.rstrip('/')).name}-{self.device}-{self.dtype}"
        return Path("exports") / (name + (f"-{self.quantize}" if self.quantize != "none" else ""))


# What bench can time. engine-*: lora-med's engine on the export's decode graph (what serve runs); the rest are
# peers measured on purpose with transformers' generate(): PyTorch (eager fp32, merged, fp16 on CUDA, fp16 with
# a static cache and CUDA graphs) and ONNX Runtime through Optimum's ORTModelForCausalLM.
# genai-*: onnxruntime-genai's own generator on its model builder's graph of the same model (an optional peer,
# installed by scripts/setup-genai.sh).
BackendName = Literal[
    "engine-cpu-fp32",
    "engine-cpu-int8",
    "engine-cpu-int4",
    "engine-cuda-fp32",
    "engine-cuda-fp16",
    "torch-eager",
    "torch-merged",
    "torch-eager-fp16",
    "torch-cudagraph-fp16",
    "ort-cpu-fp32",
    "ort-cpu-int8",
    "ort-cpu-int4",
    "ort-cuda-fp32",
    "ort-cuda-fp16",
    "genai-cpu-fp32",
    "genai-cpu-int4",
    "genai-cuda-fp16",
]
BACKENDS: tuple[str, ...] = get_args(BackendName)
ShapeName = Literal["dialogpt-medium", "qwen2.5-0.5b", "llama-3.2-1b", "tiny", "tiny-qwen2"]
GateStat = Literal["p50", "p95", "p99"]


@dataclass
class BenchConfig:
    """Settings of ``lora-med bench`` (also the keys of its ``--config`` YAML)."""

    # what to measure
    run: str | None = setting(None, "LoRA/QLoRA run folder (its held-out set is the eval data)")
    full_run: str | None = setting(
        None, "full fine-tune run folder, compared with --run on the same held-out set", aliases=("--full_run",)
    )
    export: list[str] | None = setting(
        None, "merge-export folders (comma-separated); each gives ONNX Runtime backends", metavar="DIR,DIR,..."
    )
    base: str | None = setting(None, "base model for the base perplexity [default: the run card's base]")
    shape: ShapeName | None = setting(None, "random weights of this model's shape: latency only")
    paired: bool = setting(False, "train LoRA and full on the same split/seed/budget, merge-export both, then bench")
    lora_config: str | None = setting(None, "--paired: train YAML for the LoRA run (e.g. configs/default.yaml)")
    full_config: str | None = setting(None, "--paired: train YAML for the full fine-tune (e.g. configs/full.yaml)")
    data: str = setting(DEFAULT_DATA, "--paired: training conversations")
    eval_data: str | None = setting("auto", "--paired: held-out set (as `lora-med train --eval-data`)")
    allow_eval_overlap: bool = setting(
        False, "--paired: evaluate even on conversations also trained on (as `lora-med train --allow-eval-overlap`)"
    )
    epochs: float = setting(3.0, "--paired: epochs for both runs", above=0)
    max_steps: int = setting(-1, "--paired: > 0 overrides epochs", min=-1)
    train_batch_size: int = setting(4, "--paired: batch size for both runs", min=1)
    seed: int = setting(42, "--paired: seed for both runs; also seeds --shape weights and prompts", min=0)
    paired_dir: str | None = setting(None, "--paired: where runs and exports go [default: adapters/paired-<name>]")
    min_top1: float = setting(
        GATE_MIN_TOP1, "--paired: int8/fp16 export gate, top-1 agreement (merge-export --min-top1)", above=0, max=1
    )
    min_same_replies: float = setting(
        GATE_MIN_SAME_REPLIES,
        "--paired: int8/fp16 export gate, share of identical greedy replies (merge-export --min-same-replies)",
        min=0,
        max=1,
    )
    # latency
    backends: list[BackendName] | None = setting(
        None, "subset of the backends to time, timed in this order [default: all available]"
    )
    device: Device = setting("auto", "where the PyTorch backends run (CUDA ONNX backends need cuda)")
    new_tokens: int = setting(
        32, "tokens every backend generates per reply (EOS cannot stop it early)", min=1, aliases=("--new_tokens",)
    )
    prompts: int = setting(8, "held-out prompts timed per backend", min=1)
    repeats: int = setting(3, "timed replies per prompt", min=1)
    warmup: int = setting(2, "untimed replies before timing", min=0)
    scaling: bool = setting(True, "reply time vs new tokens (8..64) and context (32..512)")
    scaling_repeats: int = setting(3, "timed replies per scaling point (the median is reported)", min=1)
    throughput: bool = setting(True, "engine backends: tokens/s with batches of 1, 4 and 16 prompts")
    concurrent: int = setting(
        8,
        "engine and genai backends: useful tokens/s of this many prompts arriving together, each wanting a reply "
        "of its own length (1/4 to 2x --new-tokens); 0: off",
        min=0,
    )
    system_tokens: int = setting(
        0,
        "the concurrent workload's prompts all start with this many shared tokens, as a server's start with its "
        "system prompt: the engine keeps them in its prefix cache (as serve does), genai in a generator it rewinds",
        min=0,
    )
    genai_python: str | None = setting(
        None,
        "the interpreter of the separate environment holding onnxruntime-genai's model builder, which builds the "
        "genai-* peers' graphs [default: .venv-genai/bin/python in the checkout; scripts/setup-genai.sh makes it]",
    )
    threads: int | None = setting(None, "intra-op threads for PyTorch and ONNX Runtime [default: one per core]", min=1)
    ppl_batch_size: int = setting(8, "perplexity batch (does not change the figure: token-weighted)", min=1)
    # gate
    gate_backend: str = setting(
        "auto",
        "backend the latency gate reads; auto: the first present of engine-cuda-fp16, "
        "engine-cpu-int8, engine-cpu-fp32, ort-cuda-fp16, ort-cpu-int8, ort-cpu-fp32, "
        "torch-merged, torch-eager",
        aliases=("--gate_backend",),
    )
    gate_stat: GateStat = setting("p50", "reply-time statistic for the latency gate")
    max_latency_s: float = setting(
        0.2, "reply-time limit in seconds on the gate backend; <= 0: no latency gate", aliases=("--max_latency_s",)
    )
    max_ppl_ratio: float | None = setting(
        None,
        "LoRA ppl / full ppl must be <= this [default: 1.10 when both runs are given]; <= 0: off",
        aliases=("--max_ppl_ratio",),
    )
    min_ppl_gain: float | None = setting(
        None,
        "base ppl / fine-tuned ppl must be >= this [default: 1.0 when a run is given]; <= 0: off",
        aliases=("--min_ppl_gain",),
    )
    # output
    name: str | None = setting(None, 'report name [default: from the run, the shape or "paired"]')
    out: str | None = setting(None, "report folder [default: reports/<name>]")
    note: str | None = setting(None, "free text recorded in the report's notes (e.g. what else shared the machine)")


@dataclass
class ServeConfig:
    """Settings of ``lora-med serve`` (also the keys of its ``--config`` YAML)."""

    # model
    model: str = setting(
        "",
        "a merge-export folder (its engine/ or merged/) or a Hugging Face model folder; the positional EXPORT_DIR",
        hidden=True,
    )
    device: Device = setting("auto", "where replies are computed")
    threads: int | None = setting(None, "CPU threads for generation [default: the engine's]", min=1)
    max_new_tokens: int = setting(40, "longest reply in tokens; a reply stops earlier at EOS", min=1)
    no_repeat_ngram_size: int = setting(
        3, "never repeat an n-gram in a reply (0: off); small models loop without it", min=0
    )
    do_sample: bool = setting(False, "sample instead of greedy decoding")
    temperature: float = setting(1.0, "sampling only", above=0)
    top_p: float = setting(1.0, "sampling only", above=0, max=1)
    system_prompt: str | None = setting(
        None,
        "a system message put first in every prompt, in the model's training format (its chat template, or a "
        "first DialoGPT turn); never cut when a long conversation is",
    )
    prefix_cache_mb: float = setting(
        256.0,
        "memory for keeping conversations' KV cache between turns, so that a "
        "follow-up computes only its new tokens (CPU decode graph; 0: off)",
        min=0,
    )
    cut_block: int = setting(
        64,
        "a conversation longer than the prompt budget is cut at the first turn after a "
        "multiple of this many tokens, so its start stays put for a few turns and the prefix "
        "cache can reuse them; costs up to this many tokens of old context (0: drop only the "
        "oldest turns that must go)",
        min=0,
    )
    # server
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 exposes it to the network)")
    port: int = setting(8000, 'TCP port; 0 picks a free one (logged in the "ready" line)', min=0, max=65535)
    # conversations
    db: str = setting(
        "lora-med-serve.db", "SQLite file (WAL mode, created 0600) holding every turn; history survives restarts"
    )
    store: str | None = setting(
        None,
        "a postgresql://user@host/db URL: conversations in PostgreSQL, shared by several replicas (needs "
        "`pip install lora-med[postgres]`); default: the SQLite file --db",
        metavar="URL",
    )
    store_pool: int = setting(4, "PostgreSQL connections kept per server (and store threads using them)", min=1)
    idle_minutes: float = setting(30.0, "a message after this much silence starts a new conversation", above=0)
    intents: str = setting(DEFAULT_INTENTS, "rules deriving `action` and `params.status`")
    emergency: str = setting(DEFAULT_EMERGENCY, "triage rules (emergency / caution / none), decided before the model")
    # the clinic's facts (docs/facts.md)
    facts: str = setting(
        DEFAULT_FACTS,
        "the clinic's facts (YAML): info answers and the booking are built from them, every model reply is "
        "checked against them",
    )
    replies: str = setting(DEFAULT_REPLIES, "templates of the replies built from --facts")
    check_replies: bool = setting(
        True,
        "hold every model reply to --facts and replace a wrong one with the facts' reply (off: the model's "
        "words go out as written; for measuring a model, never for patients)",
    )
    words: list[str] = setting(
        [DEFAULT_DATA],
        "conversation files (comma-separated) whose words the reply checker knows: a model reply with a word "
        "found in none of them, --facts, --replies or the conversation is rejected as garbled (give the "
        "model's training data)",
    )
    now: str | None = setting(
        None,
        "answer as if it were this moment at the clinic, YYYY-MM-DD or YYYY-MM-DDTHH:MM (replays and tests) "
        "[default: the clinic's clock, in --facts' timezone]",
    )
    # limits
    max_message_chars: int = setting(1000, "longer messages get 422", min=1)
    rate_limit: int = setting(
        20, "messages per user per --rate-window-s (0: no limit); emergencies are never limited", min=0
    )
    rate_window_s: float = setting(60.0, "the rate limit's window in seconds", above=0)
    max_batch: int = setting(8, "most replies generated together (rows of the engine's running batch)", min=1)
    batch_wait_ms: float | None = setting(
        None,
        "how long the first request of an idle engine waits for company "
        "[default: 0 where requests join a running batch (the CPU decode graph), "
        "5 where they wait for a whole batch (PyTorch, CUDA graphs)]",
        min=0,
        max=1000,
    )
    request_timeout_s: float = setting(
        30.0,
        "a reply not ready by then gets 504; a request whose expected wait for the model is longer is "
        "refused at once (503 with Retry-After; emergencies never are)",
        above=0,
    )
    max_body_bytes: int = setting(64 * 1024, "larger request bodies get 413 before any of it is parsed", min=1024)
    # access
    api_key_file: str | None = setting(
        None,
        "file of API keys, one per line (several: rotation); every route but /health/live and /health/ready "
        "then needs `Authorization: Bearer KEY` (the LORA_MED_API_KEY variable gives one key too)",
        metavar="FILE",
    )
    insecure_no_auth: bool = setting(
        False, "allow a --host beyond this machine without an API key (anyone reaching the port reads patients' chats)"
    )
    # the OpenAI-compatible API (/v1)
    model_id: str | None = setting(None, "the model's name on /v1/models [default: the EXPORT_DIR folder's name]")
    stream_release: Literal["sentence", "reply"] = setting(
        "sentence",
        "when streamed text leaves the server: sentence (each complete sentence once the reply so far has passed "
        "the checks) or reply (the whole checked reply at once, exactly what /chat/ would say)",
    )
    log_file: str | None = setting(None, "JSON-lines log file [default: stderr]")
