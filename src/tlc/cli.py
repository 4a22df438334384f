"""Command line: ``tlc compress | benchmark | demo | report | export``.

Bad options, specs, missing files and mismatches print one ``tlc: error: ...`` line and exit with status
2 (the options of ``compress`` are checked before any work starts); an interrupted run prints how to
resume it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _add_compress_options(p: argparse.ArgumentParser, method: str) -> None:
    p.add_argument("--method", default="tlc",
                   help="compression method: a registered name or py:FILE.py:CLASS (default: tlc); "
                        "`tlc compress --method NAME --help` lists its settings")
    p.add_argument("--preset", default="default", help="the method's named settings (default, paper, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="one setting of the method or of the run (repeatable), e.g. --set gap_tolerance=0.1")
    _add_run_options(p)
    p.add_argument("--latency-batch-sizes", type=int, nargs="+", default=[1], metavar="B")
    p.add_argument("--onnx-latency", action="store_true", help="also time ONNX Runtime")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The settings of a run that every method shares (budget, stopping, fine-tuning, merge, device)."""
    p.add_argument("--max-acc-drop", type=float, default=1.0, metavar="POINTS",
                   help="accuracy budget: points of validation accuracy the result may lose (default 1.0)")
    p.add_argument("--max-steps", type=int, help="stop after this many compression steps")
    p.add_argument("--target-macs-ratio", type=float, help="stop once MACs <= this fraction of the original")
    p.add_argument("--target-speedup", type=float, help="stop once the measured batch-1 speed-up reaches this")
    p.add_argument("--finetune-epochs", type=float, help="fine-tuning epochs after each step")
    p.add_argument("--final-finetune-epochs", type=float, help="fine-tuning epochs for the chosen model")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, help="fine-tuning batch size")
    p.add_argument("--optimizer", choices=["sgd", "adamw"],
                   help="fine-tuning optimizer (default: the model family's recipe, printed at the start)")
    p.add_argument("--weight-decay", type=float, help="fine-tuning weight decay")
    p.add_argument("--distill", action="store_true", help="fine-tune with knowledge distillation from the original")
    p.add_argument("--policy", choices=["macs", "latency", "always", "never"],
                   help="merge policy (default macs; latency: merge where a latency table measured on this machine, "
                   "for the first --latency-batch-sizes and backend, says it pays)")
    p.add_argument("--calibration-size", type=int, help="samples used to rank sites")
    p.add_argument("--gap-tolerance", type=float, help="joint loss gap allowed in one step")
    p.add_argument("--rejection-patience", type=int, metavar="N",
                   help="stop after N rejected steps in a row (default 2; 1 stops at the first)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")


def _method_named(argv: list[str]) -> str:
    """The --method of a command line, read before the parser is built (its settings go in the help)."""
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return "tlc"


def _method_help(name: str) -> str:
    """The settings and presets of a method, for the compress help."""
    import dataclasses

    from tlc.methods.base import method_class

    try:
        cls = method_class(name)
    except Exception as exc:  # noqa: BLE001 - the help must print whatever the method file does
        return f"method {name}: {exc}"
    lines = [f"method {cls.name}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}",
             f"presets: {', '.join(cls.presets)}", "its own settings (--set KEY=VALUE):"]
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} = {default!r}")
    return "\n".join(lines)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """What names the trained model and its data (compress and benchmark)."""
    from tlc.zoo.data import DATA_SPECS

    p.add_argument("--model", required=True,
                   help="torchvision:NAME | timm:NAME | hf:PATH | tlc:NAME | py:FILE.py:FUNCTION")
    p.add_argument("--data", required=True, help="\n".join(f"{k}: {v}" for k, v in DATA_SPECS.items()))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--weights", help="trained weights: .safetensors or a state_dict file (loaded weights_only)")
    p.add_argument("--num-classes", type=int, help="classes of the model's head (default: from the data)")
    p.add_argument("--train-epochs", type=float, default=0.0,
                   help="train the model this many epochs before compressing (for models without weights)")


def _add_benchmark_parser(sub: Any) -> None:
    b = sub.add_parser("benchmark", help="every method on one model, side by side (and a width-pruning baseline)",
                       formatter_class=argparse.RawTextHelpFormatter)
    _add_model_options(b)
    b.add_argument("--methods", nargs="+", metavar="NAME[:PRESET]",
                   help="the methods to compare (default: every registered method, default preset), e.g. "
                        "tlc easier lacoot:paper")
    b.add_argument("--baseline", nargs="+", default=[], metavar="NAME",
                   choices=["torch-pruning", "torch-pruning-taylor"],
                   help="width-pruning baselines through Torch-Pruning (pip install 'tlc[peers]'), pruned to the MACs\n"
                        "of the best depth result and fine-tuned for the same epochs")
    _add_run_options(b)
    b.add_argument("--latency-batch-size", type=int, default=32, metavar="B",
                   help="batch size timed besides batch 1 (default 32)")
    b.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"], choices=["eager", "onnxruntime"],
                   help="backends timed side by side (default both)")
    b.add_argument("--resume", action="store_true", help="continue an interrupted benchmark in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bars")


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlc", description="Make trained networks shallower and faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    method = _method_named(list(argv) if argv is not None else sys.argv[1:])
    c = sub.add_parser("compress", help="compress a trained model", formatter_class=argparse.RawTextHelpFormatter,
                       epilog=_method_help(method) if "-h" in (argv or sys.argv) or "--help" in (argv or sys.argv)
                       else None)
    _add_model_options(c)
    _add_compress_options(c, method)
    _add_benchmark_parser(sub)
    d = sub.add_parser("demo", help="train a small network, compress it, print before/after")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--data", default="digits", choices=["digits", "fashion-mnist"])
    d.add_argument("--quiet", action="store_true")
    r = sub.add_parser("report", help="print the before/after table of a run (or the table of a benchmark) and "
                                      "draw its plots (reads report.json / benchmark.json only: no model is built)")
    r.add_argument("dir")
    r.add_argument("--no-plots", action="store_true")
    e = sub.add_parser("export", help="export a compressed model")
    e.add_argument("dir")
    e.add_argument("--onnx", action="store_true", required=True, help="write DIR/model.onnx (verified)")
    e.add_argument("--output", help="file to write (default DIR/model.onnx)")
    e.add_argument("--trust-code", action="store_true",
                   help="run the Python file a py: model spec in DIR names (or read the Hugging Face folder "
                        "outside DIR it names); only for a folder you trust")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tlc`` command."""
    args = _parser(argv).parse_args(argv)
    from tlc.errors import TLCError

    try:
        commands = {"compress": _compress, "benchmark": _benchmark, "demo": _demo, "report": _report,
                    "export": _export}
        with _process_group(args):
            return commands[args.command](args)
    except (TLCError, OSError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if not getattr(exc, "shared", False):  # an error every rank got from rank 0 is printed by rank 0 alone
            print(f"tlc: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or getattr(args, "dir", "")
        print(f"\ntlc: interrupted; continue with the same command and --resume (outputs in {out})", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _process_group(args: argparse.Namespace) -> Iterator[None]:
    """Under torchrun (WORLD_SIZE > 1) ``tlc compress`` (and ``tlc benchmark``) is one run over all the
    processes: each joins the group (gloo on the CPU; NCCL and the GPU of its local rank with --device cuda),
    only rank 0 prints, and the group is left at the end."""
    if args.command not in ("compress", "benchmark") or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    from tlc.train.distributed import init_from_env

    _check_device(args.device)
    env = init_from_env("cuda" if torch.device(args.device).type == "cuda" else "cpu")
    args.device = str(env.device)
    try:
        with open(os.devnull, "w") as devnull, contextlib.ExitStack() as quiet:
            if env.rank != 0:
                quiet.enter_context(contextlib.redirect_stdout(devnull))
            yield
    finally:
        dist.destroy_process_group()


# ============================================================================ compress


# (option, valid, what it must be): the options of `tlc compress` that can be judged alone
_RULES: tuple[tuple[str, Any, str], ...] = (
    ("threads", lambda v: v >= 1, "at least 1"),
    ("num_classes", lambda v: v >= 1, "at least 1"),
    ("max_steps", lambda v: v >= 1, "at least 1"),
    ("calibration_size", lambda v: v >= 1, "at least 1"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("rejection_patience", lambda v: v >= 1, "at least 1"),
    ("max_acc_drop", lambda v: v >= 0, "a number of points >= 0"),
    ("target_speedup", lambda v: v > 0, "a speed-up > 0"),
    ("target_macs_ratio", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    ("finetune_epochs", lambda v: v >= 0, "a number of epochs >= 0"),
    ("final_finetune_epochs", lambda v: v >= 0, "a number of epochs >= 0"),
    ("train_epochs", lambda v: v >= 0, "a number of epochs >= 0"),
    ("lr", lambda v: v > 0, "a learning rate > 0"),
    ("gap_tolerance", lambda v: v >= 0, "a loss gap >= 0"),
)


def _check_compress_args(args: argparse.Namespace) -> None:
    """Refuse, before any work starts and before anything is written, every option of ``tlc compress``
    that is wrong on its own: numbers out of range, the output folder, the device, the weights file."""
    from tlc.errors import SpecError
    from tlc.train.distributed import on_main
    from tlc.zoo.models import check_weights_file

    for name, valid, requirement in _RULES:
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and valid(value)):
            raise SpecError(f"--{name.replace('_', '-')} {value} must be {requirement}")
    flag = "--latency-batch-sizes" if hasattr(args, "latency_batch_sizes") else "--latency-batch-size"
    sizes = args.latency_batch_sizes if hasattr(args, "latency_batch_sizes") else [args.latency_batch_size]
    bad = [b for b in sizes if b < 1]
    if bad:
        raise SpecError(f"{flag} {bad[0]}: batch sizes must be at least 1")
    on_main(_check_out, Path(args.out))  # rank 0's folder: the only one a run over many processes writes
    _check_device(args.device)
    if args.weights is not None:
        check_weights_file(args.weights)


def _check_out(out: Path) -> None:
    """The output folder must be a folder, or creatable, and writable."""
    from tlc.errors import SpecError

    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise SpecError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"--out {out}: {existing} is not writable")


def _check_device(name: str) -> None:
    """cpu, or cuda[:N] where such a GPU exists (mps where available)."""
    import torch

    from tlc.errors import SpecError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpecError(f"--device {name}: unknown device; use cpu or cuda") from None
    if device.type == "cpu" or (device.type == "mps" and torch.backends.mps.is_available()):
        return
    if device.type != "cuda":
        raise SpecError(f"--device {name}: tlc runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise SpecError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise SpecError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s) here")


def _config(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(method class, RunConfig, method config) from the command line: the preset, then the flags, then
    each --set."""
    from tlc.methods.base import build_configs, method_class, parse_setting

    cls = method_class(args.method)
    run, _ = build_configs(cls, args.preset)
    overrides = _run_overrides(args, run.finetune)
    overrides.update(parse_setting(cls, text) for text in args.settings)
    run, own = build_configs(cls, args.preset, overrides)
    return cls, run, own


def _run_overrides(args: argparse.Namespace, finetune: Any) -> dict[str, Any]:
    """The shared run settings the flags give: ``finetune`` (a FitConfig) with the fine-tuning flags applied,
    the budget, stopping rules, merge policy, calibration, distillation and seed."""
    import dataclasses

    from tlc.train import DistillConfig

    for flag, name in (("finetune_epochs", "epochs"), ("lr", "lr"), ("batch_size", "batch_size"),
                       ("optimizer", "optimizer"), ("weight_decay", "weight_decay")):
        if getattr(args, flag) is not None:
            finetune = dataclasses.replace(finetune, **{name: getattr(args, flag)})
    overrides: dict[str, Any] = dict(finetune=finetune, max_acc_drop=args.max_acc_drop, seed=args.seed,
                                     max_steps=args.max_steps, target_macs_ratio=args.target_macs_ratio,
                                     target_speedup=args.target_speedup)
    for name in ("policy", "calibration_size", "gap_tolerance", "final_finetune_epochs", "rejection_patience"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.distill:
        overrides["distill"] = DistillConfig()
    return overrides


def _load(model_spec: str, data_spec: str, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from tlc.errors import SpecError
    from tlc.zoo.data import load_data
    from tlc.zoo.models import build_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec(model_spec)
    tokenizer = load_tokenizer(spec) if spec.kind == "hf" else None
    data = load_data(data_spec, seed=args.seed, tokenizer=tokenizer)
    if data.kind == "text" and tokenizer is None:
        raise SpecError(f"{data.name} is text data: use a Hugging Face model (--model hf:PATH)")
    num_classes = args.num_classes or data.num_classes
    if num_classes != data.num_classes:
        raise SpecError(f"--num-classes {num_classes} does not match the {data.num_classes} classes of {data.name}")
    in_channels = data.input_shape[0] if data.input_shape else None
    model, built = build_model(spec, num_classes=num_classes, in_channels=in_channels, weights=args.weights)
    _check_shapes(model, data)
    return model, built, data


def _check_shapes(model: Any, data: Any) -> None:
    import torch

    from tlc._inputs import logits
    from tlc.errors import SpecError

    inputs = data.example_inputs(2)
    try:
        with torch.no_grad():
            out = model.eval()(**inputs) if isinstance(inputs, dict) else model.eval()(inputs)
    except (RuntimeError, ValueError, TypeError) as exc:
        shape = data.input_shape or "token ids"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"the model cannot take {data.name} inputs of shape {shape}: {first}") from exc
    classes = logits(out).shape[-1]
    if classes != data.num_classes:
        raise SpecError(f"the model outputs {classes} classes, {data.name} has {data.num_classes}")


def _family_recipe(model: Any, run: Any, args: argparse.Namespace) -> Any:
    """The run with the fine-tuning recipe of the model's family (a transformer: AdamW at 2e-5, not the CNN
    recipe's SGD at 0.01) unless the command line names its own optimizer, learning rate, batch or weight
    decay; printed."""
    import dataclasses

    from tlc.train.recipes import describe, model_family, recipe

    family = model_family(model)
    fitting = recipe(family, "paper" if getattr(args, "preset", None) == "paper" else "finetune")
    own = any(getattr(args, flag, None) is not None for flag in ("lr", "batch_size", "optimizer", "weight_decay"))
    if family != "cnn" and fitting is not None and not own:
        epochs = args.finetune_epochs if args.finetune_epochs is not None else fitting.epochs
        run = dataclasses.replace(run, finetune=dataclasses.replace(fitting, epochs=epochs))
    print(f"fine-tuning recipe ({family}): {describe(run.finetune)}")
    return run


def _pretrain(model: Any, data: Any, epochs: float, out: Path, args: argparse.Namespace, quiet: bool) -> None:
    """Train an untrained model first, checkpointed after every epoch in OUT/pretrain/ (so that a rerun or
    --resume continues an interrupted training where it stopped) and kept in OUT/trained.safetensors."""
    import dataclasses

    from tlc.train import distributed, fit
    from tlc.train.checkpoint import latest_complete
    from tlc.train.loop import CHECKPOINT_PREFIX, drop_other_world
    from tlc.train.recipes import describe, model_family, recipe
    from tlc.zoo.models import load_weights

    path, checkpoints = out / "trained.safetensors", out / "pretrain"
    if distributed.on_main(path.is_file):  # under torchrun: rank 0's folder, its weights sent to every rank
        distributed.on_main(load_weights, model, path)
        distributed.broadcast_state(model)
        print(f"using the model trained earlier: {path}")
        return
    config = dataclasses.replace(recipe(model_family(model), "pretrain", epochs),
                                 **({"batch_size": args.batch_size} if getattr(args, "batch_size", None) else {}))
    print(f"training recipe ({model_family(model)}): {describe(config)}")
    if distributed.on_main(drop_other_world, checkpoints):
        print("the interrupted training ran with another number of processes: it starts over")
    earlier = distributed.on_main(latest_complete, checkpoints, CHECKPOINT_PREFIX)
    if earlier is not None:
        print(f"continuing the interrupted training from {checkpoints / earlier}")
    fit(model, data.train, config, collate_fn=data.collate_fn, device=args.device, seed=args.seed,
        checkpoint_dir=checkpoints, resume=True, progress=not quiet, description="training")
    distributed.on_main(_keep_trained, model, out, checkpoints)


def _keep_trained(model: Any, out: Path, checkpoints: Path) -> None:
    """OUT/trained.safetensors, written atomically; the training checkpoints are removed."""
    from tlc.train.checkpoint import remove_checkpoints, save_weights

    save_weights(model, out / "trained.safetensors")
    remove_checkpoints(checkpoints)


def _compress(args: argparse.Namespace) -> int:
    import torch

    from tlc.run.loop import compress

    _check_compress_args(args)  # bad options and settings are refused before any work
    method, run, own = _config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, spec, data = _load(args.model, args.data, args)
    run = _family_recipe(model, run, args)
    out = Path(args.out)
    if args.train_epochs:
        _pretrain(model, data, args.train_epochs, out, args, args.quiet)
    backends = ("eager", "onnxruntime") if args.onnx_latency else ("eager",)
    result = compress(
        model, data.train, data.val, method=method, config=run, method_config=own, test_data=data.test,
        collate_fn=data.collate_fn, example_inputs=data.example_inputs(2), out_dir=out, resume=args.resume,
        device=args.device, progress=not args.quiet, model_spec=spec.to_json(), data_spec=_data_label(data),
        latency_batch_sizes=tuple(args.latency_batch_sizes), latency_backends=backends,
    )
    print()
    print(result)
    trust = ", trust_code=True" if spec.kind == "py" else ""  # the folder names your Python file
    print(f"\noutputs in {out}/: report.json, steps.csv, recipe.json + weights.safetensors "
          f"(tlc.load('{out}'{trust}))")
    return 0


# ============================================================================ benchmark


def _benchmark(args: argparse.Namespace) -> int:
    import torch

    from tlc.run.benchmark import Timing, benchmark, check_baselines, parse_entries
    from tlc.run.config import RunConfig

    _check_compress_args(args)  # bad options, methods and baselines are refused before any work
    parse_entries(args.methods)
    check_baselines(args.baseline)
    timing = Timing(batch_size=args.latency_batch_size, backends=tuple(args.backends), threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, spec, data = _load(args.model, args.data, args)
    run = _family_recipe(model, RunConfig(finetune=_run_overrides(args, RunConfig().finetune)["finetune"]), args)
    out = Path(args.out)
    if args.train_epochs:
        _pretrain(model, data, args.train_epochs, out, args, args.quiet)
    result = benchmark(
        model, data.train, data.val, out_dir=out, methods=args.methods, baselines=args.baseline, resume=args.resume,
        timing=timing, test_data=data.test, collate_fn=data.collate_fn, example_inputs=data.example_inputs(2),
        device=args.device, progress=not args.quiet, model_spec=spec.to_json(), data_spec=_data_label(data),
        **_run_overrides(args, run.finetune))
    print()
    print(result)
    plot = f", {result.plot_path.name}" if result.plot_path else ""
    print(f"\noutputs in {out}/: benchmark.json{plot}, and each method's folder under runs/ "
          "(tlc.load, tlc export, tlc report)")
    return 0


# ============================================================================ demo


def _demo(args: argparse.Namespace) -> int:
    import torch

    from tlc.run.config import RunConfig
    from tlc.run.loop import compress
    from tlc.train import FitConfig

    torch.manual_seed(0)
    ns = argparse.Namespace(seed=0, num_classes=None, weights=None, device="cpu", batch_size=64)
    model, spec, data = _demo_model(args.data, ns)
    out = Path(args.out)
    print(f"demo: {spec.spec} on {data.name} ({len(data.train)} training images), outputs in {out}/")
    _pretrain(model, data, 30 if args.data == "digits" else 2, out, ns, args.quiet)
    config = RunConfig(max_acc_drop=1.0, finetune=FitConfig(epochs=2.0, lr=0.01, batch_size=64),
                       calibration_size=270, max_steps=10)
    result = compress(model, data.train, data.val, config=config, test_data=data.test, collate_fn=data.collate_fn,
                      example_inputs=data.example_inputs(2), out_dir=out, resume=(out / "checkpoints").exists(),
                      progress=not args.quiet, model_spec=spec.to_json(), data_spec=_data_label(data),
                      latency_batch_sizes=(1, 32))
    print()
    print(result)
    print(f"\noutputs in {out}/ - `tlc report {out}` draws the plots, `tlc export {out} --onnx` writes model.onnx")
    return 0


def _data_label(data: Any) -> str:
    """The dataset's name with the input shape it was loaded at, as reports record it: the demo's digits
    are resized to 16 px, which the name alone does not say."""
    if data.input_shape is None:
        return data.name
    return f"{data.name} ({'x'.join(str(d) for d in data.input_shape)})"


def _demo_model(data_spec: str, ns: argparse.Namespace) -> tuple[Any, Any, Any]:
    from tlc.zoo.data import load_data
    from tlc.zoo.models import build_model

    data = load_data(data_spec, seed=0, image_size=16 if data_spec == "digits" else None)
    model, spec = build_model("tlc:cifar_mobilenet_v2", num_classes=data.num_classes, in_channels=1,
                              width_mult=0.5)
    return model, spec, data


# ============================================================================ report / export


def _report(args: argparse.Namespace) -> int:
    from tlc.report.tables import format_table

    if (Path(args.dir) / "benchmark.json").is_file():
        return _benchmark_report(args)
    report, path = _read_report(Path(args.dir))
    with _malformed(path):
        table = format_table(report)
    print(table)
    if not args.no_plots:
        from tlc.io.plots import write_plots

        with _malformed(path):
            written = write_plots(report, Path(args.dir))
        for name in written:
            print(f"wrote {name}")
    return 0


def _benchmark_report(args: argparse.Namespace) -> int:
    """The table and the Pareto plot of a benchmark folder."""
    from tlc.report.benchmark import format_benchmark
    from tlc.run.benchmark import PLOT, read_benchmark

    folder = Path(args.dir)
    summary = read_benchmark(folder)
    with _malformed(folder / "benchmark.json"):
        print(format_benchmark(summary["rows"], summary.get("timing", {})))
        if not args.no_plots:
            from tlc.io.plots import write_benchmark_plot

            print(f"wrote {write_benchmark_plot(summary, folder / PLOT)}")
    return 0


def _read_report(folder: Path) -> tuple[dict[str, Any], Path]:
    """A run's report.json, or one error line naming it."""
    from tlc.errors import SpecError
    from tlc.train.checkpoint import read_json

    path = folder / "report.json"
    if not path.is_file():
        raise SpecError(f"no report.json in {folder}: not the output of tlc compress")
    report = read_json(path)
    if not isinstance(report, dict) or not isinstance(report.get("original"), dict):
        raise SpecError(f"{path} is not a tlc report (no 'original' measurements)")
    return report, path


@contextlib.contextmanager
def _malformed(path: Path) -> Iterator[None]:
    """What a report with missing or mistyped fields raises, as one error line naming the file."""
    from tlc.errors import SpecError, TLCError

    try:
        yield
    except TLCError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise SpecError(f"{path} is not a well-formed tlc report ({type(exc).__name__}: {exc})") from exc


def _export(args: argparse.Namespace) -> int:
    from tlc.io.export import export_onnx
    from tlc.io.recipe import load, saved_example_inputs

    folder = Path(args.dir)
    model = load(folder, trust_code=args.trust_code)
    example = saved_example_inputs(folder)
    target = Path(args.output) if args.output else folder / "model.onnx"
    export_onnx(model, example, target)
    print(f"wrote {target} (checked against PyTorch with ONNX Runtime)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
