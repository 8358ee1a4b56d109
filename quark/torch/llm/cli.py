"""``quark-quantize`` (also ``python -m quark.torch.llm``): the PTQ recipes of the documentation.

Without ``--model_dir`` it quantizes the stories260K Llama embedded in the package (fp8 W8A8 with
an fp8 KV cache, calibrated on its in-domain text) and reports perplexity before and after, offline.
Bad input ends with one error line and exit status 2, with nothing written. SIGINT (Ctrl-C) and
SIGTERM end the run with one line and exit status 130 / 143, after removing the temporary folders;
``--output_dir`` keeps its previous content.

Under ``torchrun --nproc-per-node N -m quark.torch.llm ...`` the N processes calibrate data-parallel
(``quark.torch.quantization.calibration.distributed``): gloo on ``--device cpu``, NCCL on CUDA with
each rank on ``cuda:LOCAL_RANK``; only rank 0 logs at INFO, prints the table and writes the output.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

PROG = "quark-quantize"
_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.CRITICAL}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: object) -> NoReturn:
    _error_line(message)
    raise SystemExit(2)


def _error_line(message: object) -> None:
    text = " ".join(str(message).split())
    sys.stderr.write(f"{PROG}: error: {text}\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's ``KeyboardInterrupt`` so that the same clean-up runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _exit_status(interrupt: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def _formats(value: str) -> list[str]:
    from quark.torch.llm import export_step

    items = [v.strip() for v in value.split(",") if v.strip()]
    for item in items:
        if item not in export_step.EXPORT_FORMATS:
            raise argparse.ArgumentTypeError(f"{item!r} is not one of: {', '.join(export_step.EXPORT_FORMATS)}")
    return items


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" unless the help text already explains the default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    # imported here, not at the top: main() handles SIGINT/SIGTERM before torch is loaded
    from quark.torch.llm import datasets, export_step, model_loading, placement, schemes
    from quark.torch.quantization.config.resolve import UNFIT_LAYER_MODES

    parser = _Parser(prog=PROG, formatter_class=_DefaultsFormatter,
                     description="Post-training quantization of a Hugging Face causal LM with Quark: "
                                 "quantize, evaluate (perplexity, lm-eval), export (hf_format, onnx, gguf) "
                                 "or reload an export. Without --model_dir the embedded stories260K demo "
                                 "model is used (default scheme w_fp8_a_fp8 with fp8 KV cache).")
    model = parser.add_argument_group("model")
    model.add_argument("--model_dir", default=None,
                       help="Hugging Face model folder (default: the embedded stories260K Llama)")
    model.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu, cuda or cuda:N")
    model.add_argument("--multi_gpu", action="store_true", help="spread the model over all GPUs (accelerate)")
    model.add_argument("--offload", default="auto", choices=list(placement.OFFLOAD_CHOICES),
                       help="where the model waits while --device works on one decoder layer at a time: auto "
                            "(on the GPU when it fits, else CPU memory; logged), none (whole model on --device), "
                            "cpu (CPU memory), disk (on the meta device, each layer read from the checkpoint's "
                            "safetensors shards in turn; auto picks it when host memory cannot hold the model)")
    model.add_argument("--offload_folder", default=None,
                       help="--offload disk: where changed layers are written (a temporary folder inside it, "
                            "removed at the end; default: the system's temporary folder)")
    model.add_argument("--model_dtype", default="auto", choices=list(model_loading.DTYPES),
                       help="dtype to load the model in")
    model.add_argument("--trust_remote_code", action="store_true",
                       help="allow model code from the model folder (off by default)")
    model.add_argument("--add_bos", default="auto", choices=list(model_loading.BOS_MODES),
                       help="start each sequence with BOS (auto: as the tokenizer does; always for "
                            "sentencepiece-only folders)")

    quant = parser.add_argument_group("quantization")
    quant.add_argument("--quant_scheme", default=None, metavar="SCHEME",
                       help=f"one of: {', '.join(schemes.scheme_names())} (default: w_fp8_a_fp8)")
    quant.add_argument("--group_size", type=int, default=None,
                       help="group size of per-group schemes (default: 128 for int4/uint4, 16 for fp4)")
    quant.add_argument("--kv_cache_dtype", default=None, choices=list(schemes.KV_CACHE_DTYPES),
                       help="quantize the KV cache (default: not quantized; fp8 for the embedded demo)")
    quant.add_argument("--min_kv_scale", type=float, default=0.0, help="lower bound of KV-cache scales")
    quant.add_argument("--calibrate_all_experts", action="store_true",
                       help="MoE models: run every expert on every calibration token (the output still uses "
                            "the routed ones), so experts the router rarely picks get activation statistics")
    quant.add_argument("--kv_cache_post_rope", action="store_true",
                       help="quantize the KV cache after RoPE inside attention instead of at the k/v projection "
                            "outputs (QuaRot's online R3 rotation of keys only helps then)")
    quant.add_argument("--quant_algo", default=None, metavar="ALGO[,ALGO]",
                       help=f"algorithms in order, comma-separated: {', '.join(schemes.ALGORITHMS)}")
    quant.add_argument("--exclude_layers", nargs="*", default=None, metavar="PATTERN",
                       help="fnmatch patterns of layers to leave in float (default: the family's, e.g. "
                            "lm_head); give the flag alone to exclude nothing")
    quant.add_argument("--unfit_layers", default="error", choices=list(UNFIT_LAYER_MODES),
                       help="layers whose shape the scheme's group/block size does not divide (e.g. group 128 "
                            "on a 576-wide input): error (stop before any work, listing them; default), keep "
                            "(leave them in float) or fallback (the nearest format that fits: a smaller "
                            "power-of-two group, else per-channel weights, else float); each is logged and "
                            "listed in quark_summary.json")
    quant.add_argument("--moe_experts_second_step_config", default=None,
                       choices=list(schemes.MOE_SECOND_STEP_SCHEMES),
                       help="quantize MoE expert weights a second time with this scheme")
    quant.add_argument("--skip_quantization", action="store_true", help="only evaluate the float model")
    quant.add_argument("--seed", type=int, default=42, help="seed of the calibration sampling")

    calib = parser.add_argument_group("calibration data")
    calib.add_argument("--dataset", default=None,
                       help=f"{', '.join(datasets.dataset_names())} or a local .txt/.jsonl/.parquet file or "
                            "folder (default: pileval; the embedded demo uses its own text)")
    calib.add_argument("--num_calib_data", type=int, default=None,
                       help="number of calibration samples (default 128; embedded demo 4)")
    calib.add_argument("--seq_len", type=int, default=None,
                       help="tokens per calibration sample (default 512; embedded demo 256)")
    calib.add_argument("--batch_size", type=int, default=1, help="calibration batch size")

    export = parser.add_argument_group("export")
    export.add_argument("--output_dir", default=None, help="folder for the export and quark_summary.json")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    export.add_argument("--model_export", nargs="+", type=_formats, default=None, metavar="FORMAT",
                        help=f"export formats: {', '.join(export_step.EXPORT_FORMATS)} (several allowed)")
    export.add_argument("--custom_mode", default="quark", choices=list(export_step.CUSTOM_MODES),
                        help="hf_format layout: quark, awq (AutoAWQ), fp8 (native fp8) or compressed-tensors")
    export.add_argument("--fp8_scale_names", default="vllm", choices=list(export_step.FP8_SCALE_NAMES),
                        help="--custom_mode fp8 only: the consumer whose scale names are written: vllm "
                             "(weight_scale / input_scale, KV-cache scales; transformers ignores these names) "
                             "or transformers (FineGrainedFP8's weight_scale_inv / activation_scale; no "
                             "KV-cache scales)")

    reload = parser.add_argument_group("reload")
    reload.add_argument("--import_model_dir", default=None, help="folder of an exported quantized model")
    reload.add_argument("--model_reload", action="store_true", help="reload --import_model_dir and evaluate")
    reload.add_argument("--import_file_format", default="hf_format", choices=list(export_step.IMPORT_FORMATS),
                        help="format of --import_model_dir")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--skip_evaluation", action="store_true", help="no perplexity, no tasks")
    evaluation.add_argument("--skip_float_evaluation", action="store_true",
                            help="do not evaluate the float model first")
    evaluation.add_argument("--ppl_dataset", default=None,
                            help="perplexity text: 'wikitext' (hub, test split) or a local text file such "
                                 "as wiki.test.raw (default: wikitext; the embedded demo uses its stories)")
    evaluation.add_argument("--ppl_seq_len", type=int, default=None,
                            help="perplexity window (default 2048, or the model's context if shorter)")
    evaluation.add_argument("--ppl_max_windows", type=int, default=None,
                            help="score only the first N windows (default: all)")
    evaluation.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs lm-eval)")
    evaluation.add_argument("--eval_batch_size", type=int, default=1, help="lm-eval batch size")
    evaluation.add_argument("--lm_eval_limit", type=int, default=None, help="lm-eval examples per task")

    parser.add_argument("--log_severity_level", type=int, default=1, choices=sorted(_LEVELS),
                        help="0 debug, 1 info, 2 warning, 3 error, 4 critical")
    parser.add_argument("--dist_timeout", type=float, default=600.0,
                        help="under torchrun: seconds a rank waits for the others in a collective before the run "
                             "fails (a rank that died or hangs); default 600")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.command_line = [PROG, *(sys.argv[1:] if argv is None else argv)]
    if args.model_export is not None:
        args.model_export = list(dict.fromkeys(f for group in args.model_export for f in group))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``quark-quantize``; returns the exit status: 0, 2 for bad input (one line, nothing
    written), 1 for an I/O error, 130 for SIGINT and 143 for SIGTERM."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0)
        level = _LEVELS[args.log_severity_level]
        rank = _rank_from_env()
        if rank > 0:  # the other ranks of a torchrun job report warnings and errors only
            level = max(level, logging.WARNING)
        tag = "" if rank < 0 else f"[rank {rank}] "
        logging.basicConfig(level=level, format=f"%(levelname)s {tag}%(name)s: %(message)s")
        logging.getLogger("quark").setLevel(level)
        return _run(args)
    except KeyboardInterrupt as interrupt:
        name = "SIGTERM" if isinstance(interrupt, Terminated) else "SIGINT"
        sys.stderr.write(f"{PROG}: interrupted by {name}; temporary files removed, no partial output left\n")
        return _exit_status(interrupt)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _rank_from_env() -> int:
    """This process's rank under torchrun (-1 when not launched by it with several processes)."""
    import os

    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else -1


def _start_ranks(args: argparse.Namespace) -> bool:
    """Initialise the process group of a torchrun job (True when this call did); ``ValueError`` for a
    device choice that cannot work with one process per GPU."""
    import os

    from quark.torch.quantization.calibration import distributed

    if _rank_from_env() < 0:
        return False
    if args.device.startswith("cuda:"):
        raise ValueError(f"--device={args.device!r} under torchrun: each rank computes on cuda:LOCAL_RANK; "
                         "pass --device cuda")
    if args.multi_gpu:
        raise ValueError("--multi_gpu under torchrun: each rank already has its own GPU (data-parallel "
                         "calibration); run --multi_gpu in one process, or leave it out")
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist_timeout={args.dist_timeout} must be a positive number of seconds")
    started = distributed.init_from_env(args.device, args.dist_timeout)
    if args.device == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return started


def _exit_without_teardown(status: int) -> NoReturn:
    """End a rank of a failed torchrun job at once. Its process group cannot be torn down reliably
    once a peer has died or is leaving too (gloo's threads may call ``std::terminate`` during
    ``destroy_process_group`` or the interpreter's shutdown, turning the exit status into a SIGABRT),
    so neither runs; the run's temporary files were removed while the error propagated."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _run(args: argparse.Namespace) -> int:
    from quark.torch.llm.pipeline import run
    from quark.torch.quantization.calibration.distributed import RankFailure

    started = False
    try:
        started = _start_ranks(args)
        summary = run(args)
    except (RankFailure, ValueError, ImportError, OSError) as exc:
        status = _report_error(exc)
        if started:
            _exit_without_teardown(status)
        return status
    except BaseException:
        if started:
            _end_ranks()
        raise
    if started:
        _end_ranks()
    if _rank_from_env() <= 0:
        sys.stdout.write(summary.table() + "\n")
    return 0


def _end_ranks() -> None:
    import torch.distributed as dist

    dist.destroy_process_group()


def _report_error(exc: Exception) -> int:
    """Write the one error line for a run that stopped; the exit status."""
    from quark.torch.quantization.calibration.distributed import RankFailure

    if isinstance(exc, RankFailure):  # another rank died or timed out: nothing was written
        _error_line(exc)
        return 1
    if isinstance(exc, ValueError):
        _error_line(exc)
        return 2
    if isinstance(exc, ImportError):  # an optional package a step needs (the pre-checks name most)
        package = (exc.name or str(exc)).split(".")[0]
        _error_line(f"a package this run needs is not installed: {package!r} (pip install {package}): {exc}")
        return 2
    _error_line(f"{exc}; the output folder was left as it was")  # OSError: disk full, permissions, ...
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
