"""ONNX Runtime in lora-med, in one place: the session options every session starts from, the engine's
decode-graph backend, and the helpers for the Optimum graph an export keeps beside it (``ORTModelForCausalLM``:
loadable by stock Optimum, used for perplexity and the parity gate, measured by bench as a peer).

The decode graph (lora_med.export.decode_graph) runs with IO binding. Everything the graph reads or writes per token
lives in buffers allocated once per batch size and bound once (``IOBinding``): the KV cache at full capacity
(one OrtValue bound as both ``past_key_values.i`` and ``present.i``, so ONNX Runtime writes each new key/value
in place), the token/position/length inputs and the logits output. A decode step is then: write three tiny int arrays, ``run_with_iobinding``, read
``[batch, vocab]`` float32 logits.

- CPU: the bound inputs and the logits are numpy arrays that the OrtValues share (no copies at all). One
  cache serves every batch size up to the largest seen (a smaller batch binds views of its first rows), and
  a batch of prompts of very different lengths is prefilled in runs of similar length, each written into
  its own rows, so no compute goes to padding (the server mixes 20-token and 200-token prompts).
- CUDA: inputs and outputs are device OrtValues (``update_inplace`` copies a few bytes in; the logits are
  read back once per step); ``total_sequence_length`` stays in host memory, where GroupQueryAttention's
  CUDA kernel reads it. With ``cuda_graph=True`` (the default on CUDA) the session enables ONNX Runtime's
  ``enable_cuda_graph``: the prompt runs without capture (``gpu_graph_id = -1``: its shape changes per
  call), each decode batch size is captured once (ORT captures after its warm-up runs) and replayed per
  token. Captured graphs bake in buffer addresses, so the CUDA buffers of a batch size are never freed
  while the engine lives, batch sizes are rounded up to a power of two (padding rows) to bound their
  number, and ``total_sequence_length`` is pinned to the capacity in decode steps (a host value the
  replay cannot see change; the kernel takes each row's real length from ``seqlens_k`` on the device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import LoraMedError, first_line
from .graph_format import GRAPH_FILE
from .loop import Engine, Reuse
from .prefix_cache import PrefixCache

KV_DTYPES = {"float32": np.float32, "float16": np.float16}
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # what a decode graph's engine.json may say


def session_options(threads: int | None = None, *, spin: bool = True):
    """The SessionOptions every lora-med session starts from (decode graph and Optimum graph alike).

    Args:
        threads: intra-op threads (inter-op 1: the graphs are sequential); None: ONNX Runtime's default.
        spin: False keeps idle threads from spinning. The parity gate alternates ONNX Runtime and PyTorch calls,
            and spinning ORT threads starve PyTorch's (10x slower on 2 cores); timings keep spinning on, as a
            server would.
    """
    import onnxruntime

    so = onnxruntime.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def cuda_available() -> bool:
    """A CUDA GPU is visible (onnxruntime-gpu lists its CUDA provider even on machines without one)."""
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def ort_engine(
    folder: Path,
    info: dict,
    *,
    device: str = "auto",
    threads: int | None = None,
    cuda_graph: bool | None = None,
    spin: bool = True,
    prefix_cache_mb: float = 0,
) -> Engine:
    """An :class:`~lora_med.engine.Engine` over a decode-graph folder (see ``load_engine``)."""
    precision = info.get("precision")
    if info.get("format") != "lora-med-decode-graph" or precision not in PRECISIONS:
        raise LoraMedError(
            f"{folder}/engine.json is not a lora-med decode graph description; rebuild the folder "
            f"with lora_med.export.decode_graph.build_decode_graph"
        )
    dev = _pick_device(folder, precision, device)
    backend = _OrtBackend(
        folder, info, dev, threads, cuda_graph=(dev == "cuda") if cuda_graph is None else cuda_graph, spin=spin
    )
    cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 and backend.restores_prefixes else None
    return Engine(
        backend,
        name=f"engine-{dev}-{precision}",
        device=dev,
        precision=precision,
        eos_token_id=[int(t) for t in info.get("eos_token_ids") or [info["eos_token_id"]]],
        vocab_size=int(info["vocab_size"]),
        prefix_cache=cache,
        info={
            "backend": "onnxruntime",
            "provider": backend.provider,
            "threads": threads,
            "cuda_graph": backend.cuda_graph,
            "graph": str(folder),
            "recipe": info.get("recipe"),
            "prefix_cache_mb": prefix_cache_mb if cache is not None else 0,
        },
    )


def _pick_device(folder: Path, precision: str, device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise LoraMedError(f"device={device!r}: use auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if precision == "fp16" else "cpu"
    if device == "cuda":
        if precision != "fp16":
            raise LoraMedError(
                f"{folder}: a {precision} decode graph runs on the CPU (ONNX Runtime's CUDA "
                f"GroupQueryAttention is fp16/bf16 only, and the int8/int4 recipes are CPU kernels); "
                f"build it with precision='fp16' for CUDA, or load it with device='cpu'"
            )
        if not cuda_available():
            raise LoraMedError(
                f"{folder}: device cuda but no CUDA GPU is visible; load it with device='cpu' "
                f"(slow: fp16 on the CPU is for checks) or use an fp32/int8 graph"
            )
    return device


class _Slot:
    """The buffers and the decode binding for one batch size."""

    def __init__(self, backend: _OrtBackend, batch: int, arena: _Slot | None = None):
        self.batch = batch
        b = backend
        shape = (batch, b.n_kv_head, b.capacity, b.head_dim)
        if b.device == "cpu":  # each OrtValue shares a numpy array: its own, or the first rows of ``arena``'s
            self.kv_host: list[np.ndarray] = (
                [a[:batch] for a in arena.kv_host]
                if arena is not None
                else [np.zeros(shape, b.kv_dtype) for _ in range(2 * b.n_layer)]
            )
            self.kv = [b.device_value(a) for a in self.kv_host]
        else:  # one host array of zeros copied into each device buffer (GQA never reads past seqlens_k,
            zeros = np.zeros(shape, b.kv_dtype)  # but zeros keep a stray read finite)
            self.kv = [b.device_value(zeros) for _ in range(2 * b.n_layer)]
            del zeros
        self.logits_host: np.ndarray = (
            arena.logits_host[:batch] if arena is not None else np.zeros((batch, b.vocab), np.float32)
        )
        self.logits = b.device_value(self.logits_host)
        # Decode inputs: host arrays (shared by the OrtValue on the CPU, copied in on CUDA).
        self.ids = np.zeros((batch, 1), np.int64)
        self.pos = np.zeros((batch, 1), np.int64)
        self.seqlens = np.zeros((batch,), np.int32)
        self.total = np.zeros((), np.int32)
        self.last = np.zeros((batch, 1), np.int64)
        self.ids_v, self.pos_v, self.seqlens_v, self.last_v = (
            b.device_value(a) for a in (self.ids, self.pos, self.seqlens, self.last)
        )
        self.total_v = b.ort.OrtValue.ortvalue_from_numpy(self.total)  # host memory on every provider
        self.io = b.io
        self.run_options = b.ort.RunOptions()
        # One captured graph per batch size; without CUDA graphs "-1" (no capture) is set anyway: onnxruntime's
        # Python wrapper looks the entry up on every run, and a missing one costs a C++ exception (~65 us).
        self.run_options.add_run_config_entry("gpu_graph_id", str(batch) if b.cuda_graph else "-1")
        self.decode = b.session.io_binding()
        for name, v in (
            ("input_ids", self.ids_v),
            ("position_ids", self.pos_v),
            ("seqlens_k", self.seqlens_v),
            ("total_sequence_length", self.total_v),
            ("last_index", self.last_v),
        ):
            self.decode.bind_ortvalue_input(b.io[name], v)
        self.bind_cache_and_logits(self.decode)

    def bind_cache_and_logits(self, binding) -> None:
        _bind_cache_and_logits(binding, self.io, self.kv, self.logits)


def _bind_cache_and_logits(binding, io: dict, kv: list, logits) -> None:
    """Bind each layer's cache as both its past and its present (written in place), and the logits."""
    for i in range(len(kv) // 2):
        for j, kind in enumerate(("key", "value")):
            binding.bind_ortvalue_input(io["past_" + kind].format(i), kv[2 * i + j])
            binding.bind_ortvalue_output(io["present_" + kind].format(i), kv[2 * i + j])
    binding.bind_ortvalue_output(io["logits"], logits)


def _runs_of_similar_length(lens: np.ndarray, waste: float = 0.25) -> list[tuple[int, int]]:
    """Split rows into consecutive runs whose right padding adds at most ``waste`` to their real tokens."""
    runs, start = [], 0
    for stop in range(1, len(lens) + 1):
        if stop < len(lens):
            part = lens[start : stop + 1]
            if len(part) * int(part.max()) <= (1 + waste) * int(part.sum()):
                continue
        runs.append((start, stop))
        start = stop
    return runs


class _OrtBackend:
    def __init__(
        self, folder: Path, info: dict, device: str, threads: int | None, *, cuda_graph: bool, spin: bool = True
    ):
        import onnxruntime as ort

        self.ort = ort
        self.folder = Path(folder)
        self.device = device
        self.capacity = int(info["capacity"])
        self.n_layer, self.n_head, self.head_dim = int(info["n_layer"]), int(info["n_head"]), int(info["head_dim"])
        # Grouped-query attention (the Llama family) keeps fewer heads in the cache than it queries with.
        self.n_kv_head = int(info.get("n_kv_head", self.n_head))
        self.vocab = int(info["vocab_size"])
        self.kv_dtype = KV_DTYPES[info["kv_dtype"]]
        self.io = info["io"]
        self.cuda_graph = bool(cuda_graph and device == "cuda")
        # What CUDA graphs need of the loop, kept apart so that the CPU tests can exercise it too:
        # power-of-two batch buckets (few captured graphs) and total_sequence_length pinned to the capacity.
        self.bucket_batches = self.pin_total = self.cuda_graph
        so = session_options(threads, spin=spin)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: the graph is ours, ORT's warnings about it are not the user's
        if device == "cuda":
            # Refuse to load rather than silently run a node on the CPU (with Memcpy nodes around it).
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            cuda_opts = {"device_id": "0", "enable_cuda_graph": "1" if self.cuda_graph else "0"}
            providers = [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        model = Path(folder) / "model.onnx"
        if not model.is_file():
            raise LoraMedError(f"{folder}: engine.json without model.onnx; rebuild the decode graph")
        try:
            self.session = ort.InferenceSession(str(model), so, providers=providers)
        except Exception as e:  # ORT raises its own exception types; name the file and the cause
            raise LoraMedError(
                f"{model}: ONNX Runtime could not load the decode graph on {device}: {first_line(e, 400)}"
            ) from None
        self.provider = self.session.get_providers()[0]
        # Rows' caches can be copied out and back (engine_prefix) where they are host arrays: the CPU.
        self.restores_prefixes = device == "cpu"
        self.prefill_options = ort.RunOptions()
        self.prefill_options.add_run_config_entry("gpu_graph_id", "-1")  # prompts: shapes vary, never captured
        self.slots: dict[int, _Slot] = {}
        self.slot: _Slot | None = None  # the opened cache (CPU: the arena's rows for the stream)
        self.lens = np.zeros(0, np.int64)  # tokens in each row's cache
        # Prompts can be prefilled into free rows while others decode: the CPU's rows are views of one arena.
        self.joins = device == "cpu"

    # -- buffers

    def cache_bytes(self, rows: int) -> int:
        """Memory a cache of ``rows`` rows takes: each row's keys and values at full capacity, and its logits (CUDA
        rounds the rows up to a power of two)."""
        batch = 1 << (rows - 1).bit_length() if self.bucket_batches else rows
        kv = 2 * self.n_layer * self.n_head * self.capacity * self.head_dim * np.dtype(self.kv_dtype).itemsize
        return batch * (kv + 4 * self.vocab)

    def device_value(self, host: np.ndarray):
        """An OrtValue for ``host``: the same memory on the CPU, a device copy on CUDA."""
        if self.device == "cpu":
            return self.ort.OrtValue.ortvalue_from_numpy(host)
        return self.ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0)

    def _slot_for(self, rows: int) -> _Slot:
        batch = 1 << (rows - 1).bit_length() if self.bucket_batches else rows
        if batch not in self.slots:
            if self.device == "cpu":
                # One cache for the largest batch so far; a smaller batch binds views of its first rows, so a
                # server whose batch size changes every call neither reallocates nor faults in fresh pages.
                arena = max(self.slots.values(), key=lambda s: s.batch, default=None)
                if arena is not None and arena.batch < batch:
                    self.slots.clear()
                    arena = None
                self.slots[batch] = _Slot(self, batch, arena)
            else:
                self.slots[batch] = _Slot(self, batch)
        return self.slots[batch]

    def _opened(self) -> _Slot:
        """The cache ``open`` made (the loop opens one before any prefill, step or snapshot)."""
        if self.slot is None:
            raise LoraMedError(f"{self.folder}: the decode graph's cache is not open; call open(rows) first")
        return self.slot

    # -- the backend protocol

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        yield  # nothing to set up or restore around a generate call

    def open(self, rows: int) -> None:
        """A cache for ``rows`` rows, every row free (CPU: views of the arena, grown first if it is smaller)."""
        self.slot = self._slot_for(rows)
        self.lens = np.ones(self.slot.batch, np.int64)  # a free row counts one token (GQA needs a length >= 1)

    def prefill(
        self,
        at: list[int],
        rows: list[list[int]],
        max_new_tokens: int,
        reuse: list[Reuse | None] | None = None,
    ) -> np.ndarray:
        slot = self._opened()
        self.lens[at] = [len(r) for r in rows]
        if self.device != "cpu":  # one launch: on a GPU the padding costs little, and the kernels need the
            assert at == list(range(len(rows))), "CUDA takes a whole batch at once"  # whole batch's buffers
            self._prefill_rows(slot, rows + [[0]] * (slot.batch - len(rows)), None)
            return slot.logits.numpy()[: len(rows)]
        # A prompt costs compute in proportion to its tokens on the CPU, padding included, and the server's
        # batches mix a first message (~20 tokens) with long conversations (~250): each run of neighbouring rows
        # of similar length is prefilled on its own, straight into its rows of the cache. A row with a cached
        # prefix (reuse[i] = (entry, n)) gets the entry's first n positions copied in and runs the rest.
        reuse = reuse or [None] * len(rows)
        group: list[int] = []  # indices into rows: fresh prompts in neighbouring cache rows
        for i in range(len(rows) + 1):
            if i < len(rows) and reuse[i] is None and (not group or at[i] == at[group[-1]] + 1):
                group.append(i)
                continue
            lens = np.array([len(rows[j]) for j in group], np.int64)
            for start, stop in _runs_of_similar_length(lens) if group else ():
                self._prefill_rows(slot, rows[group[start] : group[start] + stop - start], at[group[start]])
            group = []
            if i == len(rows):
                break
            cached_prefix = reuse[i]
            if cached_prefix is None:
                group.append(i)
                continue
            entry, n = cached_prefix
            for a, cached in zip(slot.kv_host, entry.kv):
                a[at[i], :, :n] = cached[:, :n]
            self._prefill_rows(slot, [rows[i][n:]], at[i], offset=n)
        return slot.logits_host[at]

    def _prefill_rows(self, slot: _Slot, rows: list[list[int]], start: int | None, offset: int = 0) -> None:
        """Run the graph on ``rows`` (right-padded) after ``offset`` cached positions, writing their cache and
        logits: the whole slot when ``start`` is None, else rows ``start..start+len(rows)`` of it (CPU: views of
        the slot's arrays)."""
        batch, width = len(rows), max(len(r) for r in rows)
        ids = np.zeros((batch, width), np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r  # right padding: every row's new keys start at position ``offset``
        new = np.array([len(r) for r in rows], np.int64)
        pos = np.broadcast_to(np.arange(offset, offset + width, dtype=np.int64), (batch, width)).copy()
        binding = self.session.io_binding()
        for name, a in (
            ("input_ids", ids),
            ("position_ids", pos),
            ("seqlens_k", (offset + new - 1).astype(np.int32)),
            ("total_sequence_length", np.array(offset + width, np.int32)),
            ("last_index", (new - 1)[:, None]),
        ):
            binding.bind_cpu_input(self.io[name], a)
        if start is None:
            slot.bind_cache_and_logits(binding)
        else:
            part = slice(start, start + batch)
            _bind_cache_and_logits(
                binding,
                self.io,
                [self.device_value(a[part]) for a in slot.kv_host],
                self.device_value(slot.logits_host[part]),
            )
        self.session.run_with_iobinding(binding, self.prefill_options)

    def move_row(self, src: int, dst: int) -> None:
        """Move row ``src``'s cache (its tokens so far) and length to the free row ``dst`` (CPU: the arena's
        arrays; a row holds 2 x layers x kv_heads x head_dim values per token, 24.6 KB at Qwen2.5-0.5B's shape)."""
        n = int(self.lens[src])
        for a in self._opened().kv_host:
            a[dst, :, :n] = a[src, :, :n]
        self.lens[dst] = n

    def snapshot(self, row: int, n: int) -> list[np.ndarray]:
        """Copies of row ``row``'s first ``n`` cached positions, per layer key and value (CPU)."""
        return [a[row, :, :n].copy() for a in self._opened().kv_host]

    def step(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        width = len(tokens)
        # CPU: the first ``width`` rows of the arena (views); CUDA: the whole bucket its captured graph was made for.
        slot = self._slot_for(width) if self.device == "cpu" else self._opened()
        lens = self.lens[: slot.batch]
        slot.ids[:width, 0] = tokens
        slot.ids[width:, 0] = 0
        slot.pos[:, 0] = lens  # the new token's position = the row's length so far
        slot.seqlens[:] = lens  # GQA: total length after this step - 1
        # Pinned to the capacity under CUDA graphs (see the module docstring); exact otherwise.
        slot.total[...] = self.capacity if self.pin_total else int(lens.max()) + 1
        # Only busy rows grow: an idle row (free, finished or dropped) rewrites the same position just past its
        # tokens at every step, so however long it stays idle it never runs out of room.
        lens[:width][active] += 1
        if self.device == "cuda":
            slot.ids_v.update_inplace(slot.ids)
            slot.pos_v.update_inplace(slot.pos)
            slot.seqlens_v.update_inplace(slot.seqlens)
        self.session.run_with_iobinding(slot.decode, slot.run_options)
        if self.device == "cpu":
            return slot.logits_host[:width]  # ORT wrote into this very array
        return slot.logits.numpy()[:width]

    def close(self) -> None:
        self.slots.clear()
        self.slot = None
        self.session = None


# --------------------------------------------------------------------------- the Optimum graph


def onnx_dir_of(export_dir: str | Path) -> Path:
    """An export's onnx/ folder (or the folder itself when it holds the graph)."""
    d = Path(export_dir)
    return d / "onnx" if (d / "onnx").is_dir() else d


def ort_model(
    export_dir: str | Path, provider: str | None = None, use_io_binding: bool | None = None, session_options=None
):
    """Open an export's Optimum graph as ``ORTModelForCausalLM`` (KV cache on).

    Args:
        export_dir: a merge-export output folder (its ``onnx/`` is used) or an ``onnx/`` folder itself.
        provider: ONNX Runtime execution provider; None: CPUExecutionProvider.
        use_io_binding: None lets Optimum decide (on for CUDA).
        session_options: e.g. :func:`session_options`; None: Optimum's.
    Raises:
        LoraMedError: no graph there, a graph ONNX Runtime cannot parse, or the provider is not available.
    """
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf, NoSuchFile
    from optimum.onnxruntime import ORTModelForCausalLM

    onnx_dir = onnx_dir_of(export_dir)
    if not (onnx_dir / GRAPH_FILE).is_file():
        raise LoraMedError(f"{onnx_dir / GRAPH_FILE}: missing; give a `lora-med merge-export` output folder")
    provider = provider or "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        raise LoraMedError(
            f"provider {provider} is not available (have: "
            f"{', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu for CUDA"
        )
    try:
        return ORTModelForCausalLM.from_pretrained(
            onnx_dir, provider=provider, use_io_binding=use_io_binding, use_cache=True, session_options=session_options
        )
    except (InvalidProtobuf, InvalidGraph, NoSuchFile) as e:  # a damaged graph: onnxruntime's own error types
        raise LoraMedError(
            f"{onnx_dir / GRAPH_FILE}: ONNX Runtime cannot load it ({first_line(e, 200)}); "
            "the graph is damaged: export again with `lora-med merge-export`"
        ) from None


def load_ort(onnx_dir: str | Path, device: str, threads: int | None, *, spin: bool = True):
    """An export's Optimum graph as ORTModelForCausalLM, on the CPU or on CUDA with IO binding.

    IO binding keeps inputs, outputs and the KV cache on the GPU between steps (without it ORT on CUDA copies
    them every token and can be slower than PyTorch: onnxruntime#13105).
    """
    cuda = device == "cuda"
    return ort_model(
        onnx_dir,
        "CUDAExecutionProvider" if cuda else "CPUExecutionProvider",
        use_io_binding=cuda,
        session_options=session_options(threads, spin=spin),
    )


def ort_logits_fn(model):
    """(input_ids, attention_mask) -> float32 CPU logits of an ORTModelForCausalLM (never token_type_ids)."""
    import torch

    def fn(input_ids, attention_mask):
        with torch.no_grad():
            out = model(
                input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device), use_cache=False
            )
        return out.logits.float().cpu()

    return fn
