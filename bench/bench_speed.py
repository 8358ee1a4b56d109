"""Benchmark: quantization time and memory of big models, by placement (not a timed test).

Builds a Llama-shaped model with random weights (``--shape 8b`` is Llama-3-8B's, ``70b`` Llama-3-70B's,
``tiny`` a small one for CPU checks) with ``--layers`` decoder layers, or reads ``--model DIR``, and
quantizes it with one scheme per process, so each process's peak memory is its own. Placements:

- ``gpu``: the whole model on the compute device;
- ``cpu``: the model in CPU memory, one decoder layer at a time on the compute device;
- ``disk``: the model on disk (``--disk_dir``, written once with random weights, one shard per decoder
  layer, without holding the model in memory; or ``--model``), built on the meta device, each layer
  read onto the compute device in turn (changed layers go to an offload folder beside it).

Prints one JSON object per run: scheme, placement, layers, quantize and freeze seconds, seconds per
layer, peak GPU memory (GiB), peak host RSS (GiB), device name. With ``--reference PYTHON`` (an
interpreter with amd-quark 0.13 installed, not this package) each scheme also runs there on the
same shape in the same job, and the JSON gains ``reference_seconds`` and ``speedup`` (its time over ours).

    python bench/bench_speed.py --shape 8b --layers 32 --device cuda --runs fp8_kv:gpu,fp8_kv:cpu,gptq:cpu,awq:cpu
    python bench/bench_speed.py --shape tiny --device cpu --runs fp8_kv:cpu     # a check that runs anywhere
    python bench/bench_speed.py --shape 70b --layers 24 --device cuda --runs gptq:disk --disk_dir /data/l70
    python bench/bench_speed.py --shape mid --layers 2 --samples 8 --device cpu --runs gptq:cpu,awq:cpu

``--nproc 1,2`` runs each scheme data-parallel over 1 and then 2 processes (``torchrun``: NCCL, one GPU
per process, on ``--device cuda``; gloo on ``--device cpu``); each process builds the same model and
takes its share of the calibration samples. Rank 0's row gains ``nproc`` and, past one process,
``speedup_vs_1`` (the one-process time over this one).

    python bench/bench_speed.py --shape 8b --layers 4 --device cuda --runs gptq:gpu,awq:gpu --nproc 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512, num_hidden_layers=2),
    # Llama-3-8B's proportions at a quarter of its width: GPTQ/AWQ costs on a CPU in minutes
    "mid": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=16, num_key_value_heads=4,
                vocab_size=4096, num_hidden_layers=4),
    # SmolLM2-135M's (bench/quality.py's model): small layers, where per-op costs dominate on a CPU
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, num_hidden_layers=30),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, num_hidden_layers=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                vocab_size=128256, num_hidden_layers=80),
}
# scheme name -> LLMTemplate.get_config keyword arguments
SCHEMES = {
    "fp8_kv": dict(scheme="fp8", kv_cache_scheme="fp8"),
    "fp8": dict(scheme="fp8"),
    "int8_smoothquant": dict(scheme="int8", algorithm="smoothquant"),
    "gptq": dict(scheme="int4_wo_128", algorithm="gptq"),
    "awq": dict(scheme="int4_wo_128", algorithm="awq"),
    # groups of 64 (SmolLM2's 576 columns are not a multiple of 128)
    "gptq_g64": dict(scheme="int4_wo_64", algorithm="gptq"),
    "awq_g64": dict(scheme="int4_wo_64", algorithm="awq"),
    "int4_rtn": dict(scheme="int4_wo_128"),
    "mxfp4": dict(scheme="mxfp4"),
}
PLACEMENTS = ("gpu", "cpu", "disk")


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_gib() -> float:
    """Peak resident memory of this process: VmHWM on Linux (``ru_maxrss`` of a forked child starts at
    its parent's), ``ru_maxrss`` elsewhere."""
    peak = _proc_status_bytes("VmHWM")
    return peak / 2**30 if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_split_gib() -> tuple[float, float]:
    """Resident memory now split into anonymous (the process's allocations) and file-backed (the shared libraries'
    pages: CUDA's, cuBLAS's, Triton's compiler, loaded on first use) GiB; zeros where /proc is absent."""
    return tuple(round((_proc_status_bytes(f) or 0) / 2**30, 2) for f in ("RssAnon", "RssFile"))


def _rss_bytes() -> int:
    """Resident memory of this process now (VmRSS on Linux, 0 elsewhere)."""
    return _proc_status_bytes("VmRSS") or 0


class _RssSampler:
    """Resident memory before the block and its peak during it (sampled every 20 ms by a thread): the
    growth that quantizing adds to the model already in memory."""

    def __init__(self) -> None:
        import threading

        self.before = self.peak = 0
        self.split_before = self.split_after = (0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _RssSampler:
        self.before = self.peak = _rss_bytes()
        self.split_before = _rss_split_gib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.split_after = _rss_split_gib()


def _shape_config(shape: str, layers: int | None):
    import transformers

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    return transformers.LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=False, dtype="bfloat16",
                                    **dims)


def write_random_checkpoint(shape: str, layers: int | None, folder: Path) -> Path:
    """A random-weight Llama checkpoint of ``shape`` in ``folder`` (bf16, one shard per decoder layer plus
    one for the rest, and the index), written tensor by tensor: host memory holds one layer. A folder
    that already holds the index is reused."""
    import torch
    import transformers
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        return folder
    config = _shape_config(shape, layers)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    groups: dict[str, dict[str, tuple]] = {}
    for name, param in skeleton.named_parameters():
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(group, {})[name] = tuple(param.shape)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, (_group, shapes) in enumerate(sorted(groups.items())):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, dims in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(dims, dtype=torch.bfloat16)
            else:
                tensors[name] = torch.empty(dims, dtype=torch.float32).normal_(0, 0.02, generator=gen).to(
                    torch.bfloat16)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    config.save_pretrained(folder)
    index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


def build_model(shape: str, layers: int | None, placement: str, device: str):
    """A random-weight Llama of ``shape`` built on the meta device and filled where it will live."""
    import torch
    import transformers

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=False, **dims)
    home = torch.device(device if placement == "gpu" else "cpu")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device=home)
    gen_device = device if torch.device(device).type == "cuda" else "cpu"
    gen = torch.Generator(gen_device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                fresh = torch.empty(param.shape, dtype=param.dtype, device=gen_device).normal_(0, 0.02, generator=gen)
                param.copy_(fresh)
                del fresh
    with torch.device(home):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def _batches(samples: int, seq: int, vocab: int, device: str):
    import torch

    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, seq), generator=gen).to(device) for _ in range(samples)]


def _start_ranks(args: argparse.Namespace) -> int:
    """Under torchrun: the process group (NCCL with one GPU per rank, or gloo); the number of ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    from quark.torch.quantization.calibration import distributed

    distributed.init_from_env(args.device)
    if args.device == "cuda":
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    return distributed.world_size()


def run_one(args: argparse.Namespace) -> dict:
    """Quantize and freeze once in this process (one rank of ``--nproc``); the measurements as a dict."""
    import torch

    from quark.torch import LLMTemplate, ModelQuantizer

    nproc = _start_ranks(args)
    scheme, placement = args.one_run.split(":")
    cuda = torch.device(args.device).type == "cuda"
    runtime_gib = _start_cuda_runtime(args.device) if cuda else 0.0
    start = time.perf_counter()
    offload = None
    if placement == "disk":
        import tempfile

        from quark.torch.llm.model_loading import load_model_on_disk

        folder = Path(args.model or args.disk_dir)
        offload = tempfile.TemporaryDirectory(prefix="quark-offload-", dir=folder.parent)
        model = load_model_on_disk(folder, offload.name)
    elif args.model:
        import transformers

        home = args.device if placement == "gpu" else "cpu"
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype="auto", device_map=home,
                                                                  use_kernels=False).eval()
    else:
        model = build_model(args.shape, args.layers, placement, args.device)
    build_s = time.perf_counter() - start
    layers = model.config.num_hidden_layers
    config = LLMTemplate.get("llama").get_config(**SCHEMES[scheme])
    batch_device = args.device if placement == "gpu" else "cpu"
    batches = _batches(args.samples, args.seq, model.config.vocab_size, batch_device)
    kwargs = {} if args.is_reference else {"compute_device": args.device}
    quantizer = ModelQuantizer(config, **kwargs)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**30
    profiler = _profiler(args, cuda)
    layer_seconds, layer_host, capture_seconds = _layer_times()
    host = _RssSampler()
    trace = _MemoryTrace(Path(args.memory_trace) / f"{scheme}_{placement}.txt") if args.memory_trace and cuda else None
    with _recorded(profiler, model, args.profile_layers), _recorded(trace, model, args.profile_layers), host:
        start = time.perf_counter()
        quantizer.quantize_model(model, batches)
        if cuda:
            torch.cuda.synchronize()
        quantize_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.profiler.record_function("quark.freeze"):
            quantizer.freeze(model)
        if cuda:
            torch.cuda.synchronize()
        freeze_s = time.perf_counter() - start
    if profiler is not None:
        _write_profile(profiler, Path(args.profile) / f"{scheme}_{placement}_rank{os.environ.get('RANK', '0')}.txt")
    if offload is not None:
        offload.cleanup()
    return {
        "scheme": scheme, "placement": placement, "shape": args.model or args.shape, "layers": layers,
        "samples": args.samples, "seq_len": args.seq, "build_s": round(build_s, 3),
        "quantize_s": round(quantize_s, 4), "freeze_s": round(freeze_s, 4),
        "seconds_per_layer": round(quantize_s / layers, 4),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "model_gpu_gib": round(base_gpu, 2) if cuda else None,
        "peak_host_gib": round(_peak_rss_gib(), 2),
        # CUDA's runtime, started before the model is built: counted in host_before_quantize_gib, so the growth
        # to peak_host_during_quantize_gib is what the run itself adds
        "host_cuda_runtime_gib": round(runtime_gib, 2),
        "host_before_quantize_gib": round(host.before / 2**30, 2),
        "peak_host_during_quantize_gib": round(host.peak / 2**30, 2),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "implementation": "amd-quark" if args.is_reference else "quark-torch",
        "nproc": nproc,
        "layer_seconds": [round(s, 3) for s in layer_seconds],
        # quantize_model's stages (swap_linears, algorithms, calibrate, finalize) and the runners' input captures
        "stage_seconds": {k: round(v, 3) for k, v in _stage_seconds(quantizer).items()},
        "capture_seconds": [round(s, 3) for s in capture_seconds],
        # [anonymous, file-backed] resident GiB before quantizing and after freezing
        "host_split_before_gib": list(host.split_before), "host_split_after_gib": list(host.split_after),
        # [resident, page-locked, anonymous, file-backed] GiB of the process as each layer's pass ended
        "layer_host_gib": [list(h) for h in layer_host],
        "pinned_host_gib": round(_pinned_bytes() / 2**30, 2),
    }


def _start_cuda_runtime(device: str) -> float:
    """Start what any GPU program pays for once (the CUDA context, cuBLAS, cuDNN's attention, cuSOLVER) with a
    bfloat16 matmul, an attention call and GPTQ's float32 Cholesky steps; the host memory that took, in GiB."""
    import torch

    before = _rss_bytes()
    x = torch.randn(1, 8, 128, 128, device=device, dtype=torch.bfloat16)  # Llama-3 heads: 128 wide
    (x @ x.transpose(-1, -2)).sum().item()
    torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True).sum().item()
    h = torch.eye(64, device=device) * 2.0
    lower = torch.linalg.cholesky_ex(h)[0]
    torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)[0].sum().item()
    return (_rss_bytes() - before) / 2**30


def _stage_seconds(quantizer) -> dict[str, float]:
    """``quantize_model``'s seconds per stage (empty for amd-quark, which does not time them)."""
    return dict(getattr(getattr(quantizer, "summary", None), "stage_seconds", None) or {})


def _profiler(args: argparse.Namespace, cuda: bool):
    """A torch.profiler for ``--profile`` (CPU and, on a GPU, CUDA activity), else None."""
    if not args.profile:
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    return profile(activities=activities, record_shapes=False)


def _pinned_bytes() -> int:
    """Page-locked memory held by PyTorch's caching host allocator (in use and cached), 0 without CUDA."""
    import torch

    try:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)) if torch.cuda.is_available() else 0
    except (AttributeError, RuntimeError):
        return 0


def _layer_times() -> tuple[list[float], list[tuple[float, ...]], list[float]]:
    """The seconds of each decoder layer's algorithm pass, the host memory (GiB: resident, page-locked, anonymous,
    file-backed) when it ended, and the seconds of each capture of the decoder inputs, filled from the
    layer-by-layer runner's log."""
    import logging

    seconds: list[float] = []
    host: list[tuple[float, ...]] = []
    capture: list[float] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.endswith("captured in %.2fs") and record.args:
                capture.append(float(record.args[-1]))
            if record.msg.endswith("done in %.2fs") and record.args:
                seconds.append(float(record.args[-1]))
                host.append((round(_rss_bytes() / 2**30, 2), round(_pinned_bytes() / 2**30, 2),
                             *_rss_split_gib()))

    runner = logging.getLogger("quark.torch.quantization.calibration.layerwise")
    runner.setLevel(logging.DEBUG)
    runner.addHandler(_Collect(logging.DEBUG))
    return seconds, host, capture


@contextlib.contextmanager
def _between_layers(model, layers: str | None, start, stop):
    """``start()`` at decoder layer A's first forward and ``stop()`` at layer B's (``layers="A:B"``; B past the
    last layer: at the end of the block), or around the whole block without ``layers``: the steady state can
    be recorded without the first layer's kernel compilation."""
    if not layers:
        start()
        try:
            yield
        finally:
            stop()
        return
    first, last = (int(x) for x in layers.split(":"))
    decoder = model.model.layers
    state = {"on": False, "done": False}

    def begin(module, args):
        if not state["on"] and not state["done"]:
            start()
            state["on"] = True

    def end(module, args):
        if state["on"]:
            stop()
            state["on"], state["done"] = False, True

    handles = [decoder[first].register_forward_pre_hook(begin)]
    if last < len(decoder):
        handles.append(decoder[last].register_forward_pre_hook(end))
    try:
        yield
    finally:
        end(None, None)
        for handle in handles:
            handle.remove()


def _recorded(recorder, model, layers: str | None):
    """``recorder`` (a profiler or a :class:`_MemoryTrace`, or None) running between the layers ``layers``."""
    if recorder is None:
        return contextlib.nullcontext()
    return _between_layers(model, layers, recorder.start, recorder.stop)


class _MemoryTrace:
    """``--memory_trace``: records the GPU allocations (with their Python stacks) between two points, then
    writes where the peak's live memory was allocated, grouped by the first line of this project's code."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = 0

    def start(self) -> None:
        import torch

        self.base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)

    def stop(self) -> None:
        import torch

        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        try:
            self._write(snapshot["device_traces"][torch.cuda.current_device()])
        except (KeyError, IndexError, TypeError) as error:  # another PyTorch's snapshot layout
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"could not read the memory snapshot: {error!r}\n")

    def _write(self, events: list) -> None:
        current, peak, peak_at = 0, 0, -1
        for i, event in enumerate(events):
            if event["action"] == "alloc":
                current += event["size"]
            elif event["action"] == "free_completed":
                current -= event["size"]
            if current > peak:
                peak, peak_at = current, i
        live: dict[int, dict] = {}
        for event in events[:peak_at + 1]:
            if event["action"] == "alloc":
                live[event["addr"]] = event
            elif event["action"] == "free_completed":
                live.pop(event["addr"], None)
        by_site: dict[str, int] = {}
        for event in live.values():
            frames = event.get("frames") or []
            ours = [f for f in frames if "/quark/" in f["filename"] or "/bench/" in f["filename"]]
            site = " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours[:3]) or (
                f"{Path(frames[0]['filename']).name}:{frames[0]['line']}" if frames else "?")
            by_site[site] = by_site.get(site, 0) + event["size"]
        lines = [f"allocated before tracing: {self.base / 2**30:.3f} GiB; traced peak above it: {peak / 2**30:.3f} GiB",
                 "live at the peak, by allocation site (GiB):"]
        lines += [f"{size / 2**30:8.3f}  {site}" for site, size in sorted(by_site.items(), key=lambda kv: -kv[1])[:30]]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n")


def _write_profile(profiler, path: Path) -> None:
    """Two tables: the named stages (``quark.*``, ``gptq.*``, ``awq.*`` ranges; wall time on the CPU side)
    and the operators by their own device (or CPU) time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    events = profiler.key_averages()
    stages = [e for e in events if e.key.startswith(("quark.", "gptq.", "awq."))]
    lines = [f"{'stage':<40} {'calls':>7} {'cpu total s':>12}"]
    lines += [f"{e.key:<40} {e.count:>7} {e.cpu_time_total / 1e6:>12.3f}"
              for e in sorted(stages, key=lambda e: -e.cpu_time_total)]
    has_device = any(getattr(e, "self_device_time_total", 0) for e in events)
    sort = "self_cuda_time_total" if has_device else "self_cpu_time_total"
    gaps = ""
    if has_device:  # where the GPU waited (bench/gpu_gaps.py), from the Chrome trace
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_gaps import gap_summary

        trace = path.with_suffix(".trace.json")
        profiler.export_chrome_trace(str(trace))
        gaps = "\n\n" + gap_summary(json.loads(trace.read_text()))
        trace.unlink()
    path.write_text("\n".join(lines) + "\n\n" + events.table(sort_by=sort, row_limit=45, max_name_column_width=60)
                    + "\n\n" + events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
                    + gaps)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(python: str, args: argparse.Namespace, run: str, reference: bool, nproc: int = 1) -> dict:
    launch = [python] if nproc == 1 else [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                                          "--master-port", str(_free_port())]
    cmd = [*launch, str(Path(__file__).resolve()), "--child", "--one_run", run, "--shape", args.shape,
           "--device", args.device, "--samples", str(args.samples), "--seq", str(args.seq)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.model:
        cmd += ["--model", args.model]
    if args.disk_dir:
        cmd += ["--disk_dir", str(args.disk_dir)]
    if reference:
        cmd.append("--is-reference")
    else:
        cmd += ["--profile", str(args.profile)] if args.profile else []
        cmd += ["--memory_trace", str(args.memory_trace)] if args.memory_trace else []
        cmd += ["--profile_layers", args.profile_layers] if args.profile_layers else []
    env = dict(os.environ)
    if not reference:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    else:  # the reference's environment must not see this package
        env.pop("PYTHONPATH", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"run": run, "implementation": "amd-quark" if reference else "quark-torch",
                "error": " | ".join(tail)}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--model", default=None, help="a model folder to read instead of random weights")
    parser.add_argument("--device", default="cuda", help="the compute device: cuda, cuda:N or cpu")
    parser.add_argument("--runs", default="fp8_kv:gpu,fp8_kv:cpu,gptq:cpu,awq:cpu",
                        help=f"comma-separated SCHEME:PLACEMENT; schemes {', '.join(SCHEMES)}; placements "
                             f"{', '.join(PLACEMENTS)}")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (batch 1 each)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--reference", default=None, metavar="PYTHON",
                        help="an interpreter with amd-quark 0.13 (not this package) to run each scheme too")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--disk_dir", default=None,
                        help="disk placement: the checkpoint folder (written with random weights when it holds "
                             "none; default: a temporary folder, removed at the end)")
    parser.add_argument("--nproc", default="1", help="processes per run (data-parallel, torchrun); a list such as "
                                                      "1,2 runs each count in turn")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write a torch.profiler summary per run to DIR (stage times and top operators); "
                             "profiling slows the run, so time without it")
    parser.add_argument("--profile_layers", default=None, metavar="A:B",
                        help="with --profile: record from decoder layer A's first forward to layer B's only")
    parser.add_argument("--memory_trace", default=None, metavar="DIR",
                        help="on a GPU: write where the peak GPU memory was allocated (per run, to DIR; with "
                             "--profile_layers A:B only between those layers)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one_run", default=None, help=argparse.SUPPRESS)  # not --run: torchrun would take it
    parser.add_argument("--is-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for run in runs:
        scheme, _, placement = run.partition(":")
        if scheme not in SCHEMES or placement not in PLACEMENTS:
            parser.error(f"--runs: {run!r} is not SCHEME:PLACEMENT with SCHEME in {', '.join(SCHEMES)} and "
                         f"PLACEMENT in {', '.join(PLACEMENTS)}")
    try:
        counts = [int(n) for n in str(args.nproc).split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error(f"--nproc={args.nproc!r} must be positive process counts, e.g. 2 or 1,2")
    if args.reference and counts != [1]:
        parser.error("--reference runs one process (amd-quark has no data-parallel calibration); leave --nproc out")
    if args.child:
        row = run_one(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row), flush=True)
        return 0
    with contextlib.ExitStack() as stack:
        if any(run.endswith(":disk") for run in runs) and not args.model:
            if args.disk_dir is None:
                args.disk_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="quark-bench-")) + "/model"
            write_random_checkpoint(args.shape, args.layers, Path(args.disk_dir))
        _run_all(args, runs, counts)
    return 0


def _run_all(args: argparse.Namespace, runs: list[str], counts: list[int]) -> None:
    for run in runs:
        single = None
        for nproc in counts:
            ours = _child(sys.executable, args, run, reference=False, nproc=nproc)
            if nproc == 1:
                single = ours.get("quantize_s")
            elif single and ours.get("quantize_s"):
                ours["speedup_vs_1"] = round(single / ours["quantize_s"], 2)
            if nproc != counts[-1]:
                print(json.dumps(ours), flush=True)
        if args.reference:
            ref = _child(args.reference, args, run, reference=True)
            ours["reference_seconds"] = ref.get("quantize_s")
            ours["reference_error"] = ref.get("error")
            if ref.get("quantize_s") and ours.get("quantize_s"):
                ours["speedup"] = round(ref["quantize_s"] / ours["quantize_s"], 2)
        print(json.dumps(ours), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
