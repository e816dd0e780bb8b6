"""Command line: `posttrain run PIPELINE.yaml [key=value ...]`, `posttrain STAGE PIPELINE.yaml ...`.

posttrain run configs/quickstart.yaml                   # every stage in order, done ones skipped
posttrain run configs/quickstart.yaml sft.learning_rate=3e-4
posttrain sft configs/quickstart.yaml --force            # one stage, inputs from earlier stages
posttrain show configs/quickstart.yaml                   # the resolved config, validated
posttrain data preview my.parquet -n 3                   # a data set as posttrain reads it
posttrain data convert my.parquet train.jsonl --format alpaca
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import sys
from pathlib import Path

from .stages import STAGE_MODULES


def _setup_logging(run_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "posttrain.log"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers, force=True
    )
    for noisy in ("httpx", "datasets", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="Post-training pipeline, one YAML config.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in [
        ("run", "run every stage of the pipeline in order"),
        ("show", "validate the config and print it with defaults filled in"),
        *[(s, f"run only the {s} stage") for s in STAGE_MODULES],
    ]:
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("config", help="pipeline YAML file")
        # default=[]: argparse lists a `*` positional without one among the required arguments
        sp.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. sft.learning_rate=3e-4")
        if name != "show":
            what = "every stage it runs (all, --only's or --from's)" if name == "run" else "the stage"
            sp.add_argument("--force", action="store_true", help=f"re-run {what} even if complete")
        if name == "run":
            sp.add_argument(
                "--only", metavar="NAME", help="run only this stage (earlier stages' finished outputs are its inputs)"
            )
            sp.add_argument(
                "--from", dest="start", metavar="NAME", help="run this stage and every later one, even if complete"
            )
    _data_parser(sub)
    return p


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="preview a data set as posttrain reads it, or convert it to JSONL")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    preview = actions.add_parser("preview", help="print the first rows as posttrain's rows (JSON, one per line)")
    convert = actions.add_parser("convert", help="write all rows as posttrain's JSONL (temp file + rename)")
    for sp in (preview, convert):
        sp.add_argument(
            "source",
            help="a .jsonl/.json/.parquet/.csv/.arrow file, a save_to_disk or data-file "
            "directory, or a data set name in the local Hugging Face cache",
        )
    convert.add_argument("out", help="the JSONL file to write")
    for sp in (preview, convert):
        sp.add_argument(
            "--format",
            help="row layout: messages, sharegpt, alpaca, prompt_completion, prompt, "
            "preference or hh (default: detected from the columns)",
        )
        sp.add_argument("--columns", default="", help="renames first, e.g. question=prompt,response=completion")
        sp.add_argument("--split", help="the split of a DatasetDict, directory or cached data set")
        sp.add_argument(
            "--system",
            choices=["fold", "drop", "error"],
            default="fold",
            help="system turns: fold into the next user turn (default), drop, or reject the row",
        )
    preview.add_argument("-n", type=int, default=5, help="rows to print (default 5)")
    convert.add_argument("--limit", type=_positive_int, help="write at most N rows (N >= 1)")
    convert.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="a row that does not fit: stop (default), or skip it and count it",
    )


def _positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (as a source's `limit` in a config)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _data_command(args) -> int:
    """`posttrain data preview|convert`: exit 0, 1 on a data problem, 2 on a bad argument."""
    from .data import DataError, SkipReport, convert_to_jsonl, iter_rows
    from .data.conversations import json_value

    try:
        renames = dict(item.split("=", 1) for item in args.columns.split(",") if item.strip())
    except ValueError:
        print(
            f"posttrain data: --columns {args.columns!r}: expected OLD=NEW pairs separated by commas", file=sys.stderr
        )
        return 2
    spec = {
        "path": args.source,
        "columns": {k.strip(): v.strip() for k, v in renames.items()},
        "system": args.system,
        **{k: v for k, v in (("format", args.format), ("split", args.split)) if v is not None},
    }
    try:
        if args.action == "preview":
            rows = iter_rows(spec, None, need_final_assistant=False)
            try:
                for _, row in itertools.islice(rows, max(args.n, 0)):
                    print(json.dumps(row, ensure_ascii=False, default=json_value))
            finally:
                # Finish the reader now (datasets' Parquet stream and its pyarrow threads), not at interpreter
                # exit, where a trial saw 3 of 10 concurrent previews abort ("terminate called without an active
                # exception"; not reproduced here in 32 runs). The collection joins the scanner's threads while
                # Arrow is still alive, the workaround reported in huggingface/datasets#7566.
                rows.close()
                gc.collect()
            return 0
        if not args.out.endswith(".jsonl"):  # what it writes, whatever the name says
            print(f"posttrain data: {args.out}: convert writes JSON lines: name the file *.jsonl", file=sys.stderr)
            return 2
        spec.update({"on_error": args.on_error, **({"limit": args.limit} if args.limit else {})})
        report = SkipReport()
        n = convert_to_jsonl(spec, args.out, skipped=report)
    except DataError as err:
        print(f"posttrain data: {err}", file=sys.stderr)
        return 1
    print(f"posttrain data: wrote {n} rows to {args.out} ({report.read} read, {report.skipped} skipped)")
    if report.skipped:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    return 0


def _scalars(metrics: dict) -> str:
    """`key=value` for each number, string or boolean of `metrics` (floats to 4 significant digits); nested
    values are left to the stage's metrics.json."""
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def print_summary(run_dir: Path, summary: dict) -> None:
    print(f"\nposttrain: run directory {run_dir}")
    for name, info in summary.items():
        status = info.get("status")
        secs = f" in {info['seconds']:.1f}s" if "seconds" in info and status == "ran" else ""
        print(f"  {name:<8} {status}{secs}")
        for key in ("accuracy_before", "accuracy_after"):
            if isinstance(info.get(key), dict):
                value = info[key]
                print(f"           {key}: {value['overall'] if 'overall' in value else _scalars(value)}")
        for key in ("eval_loss_before", "eval_loss_after", "num_train", "num_eval", "parameters"):
            if key in info:
                print(f"           {key}: {info[key]}")
        for model_name, m in (info.get("models") or {}).items() if isinstance(info.get("models"), dict) else []:
            print(f"           {model_name}: {_scalars(m) if isinstance(m, dict) else m}")
        for artifact in ("model", "release"):
            if (run_dir / name / artifact).is_dir():
                print(f"           {artifact}: {run_dir / name / artifact}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with overrides allowed after the flags too (`run C --only eval eval.x=1`): argparse
    stops filling a positional list at the first option, and its intermixed parsing refuses subcommands."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    strays = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "only", None) and getattr(args, "start", None):
        parser.error("--only and --from exclude each other: --only runs one stage, --from that stage and all after")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.command == "data":
        return _data_command(args)
    from .config import ConfigError, dump_config
    from .data import DataError
    from .pipeline import check_pipeline, graph_lines, idle_kind_sections, idle_overrides, load_pipeline, run_pipeline

    try:
        cfg = load_pipeline(args.config, args.overrides)
    except ConfigError as err:
        print(f"posttrain: {args.config}: {err}", file=sys.stderr)
        return 2
    only = args.only if args.command == "run" else None if args.command == "show" else args.command
    listed = [name for name, _ in cfg.instances()]
    # A run computes the fingerprints of the stages before its target (to find their outputs): their sections
    # count as read. A kind not listed runs after all of them.
    read = listed[: listed.index(only) + 1] if only in listed else listed + [only] if only else listed
    # Every kind has a section, so such an override validates; said rather than errored, since a script may
    # pass the same overrides to each of its commands.
    idle = idle_overrides(cfg, args.overrides, set(read))
    for item, section in idle:
        how = (
            f"this command runs {only} and reads the stages before it; `posttrain run CONFIG --only {section}` "
            f"runs {section}"
            if section in listed
            else f"{section} is not a stage of this run ({', '.join(read)}); add it to `stages`, or run it with "
            f"`posttrain {section} CONFIG`"
        )
        print(f"posttrain: warning: override {item!r} changes nothing: {how}", file=sys.stderr)
    overridden = {section for _, section in idle}
    for kind, named in idle_kind_sections(cfg, set(read)):
        if kind in overridden:
            continue  # said above, for the override that set it
        print(
            f"posttrain: warning: section {kind!r} changes nothing: this pipeline's {kind} stages are named "
            f"{', '.join(named)}, and each reads its own section; move the settings under those names",
            file=sys.stderr,
        )
    if args.command == "show":
        try:
            check_pipeline(cfg)
        except ConfigError as err:  # MissingInput is one
            print(f"posttrain: {args.config}: {err}", file=sys.stderr)
            return 2
        print(dump_config(cfg), end="")
        print("\n# stage graph: instance (kind) <- inputs")
        for line in graph_lines(cfg):
            print(f"#   {line}")
        return 0
    from .paths import check_writable_dir

    try:
        run_dir = check_writable_dir(cfg.run_dir)
    except ValueError as err:
        print(f"posttrain: {args.config}: run_dir: {err}", file=sys.stderr)
        return 2
    _setup_logging(run_dir)
    try:
        summary = run_pipeline(cfg, only=only, force=args.force, start=getattr(args, "start", None))
    except (ConfigError, DataError, FileNotFoundError, ValueError, RuntimeError, FloatingPointError) as err:
        logging.getLogger("posttrain").error("error: %s", err)
        return 1
    except KeyboardInterrupt:
        logging.getLogger("posttrain").error(
            "interrupted: finished stages are kept; re-run the same command to continue"
        )
        return 130
    print_summary(run_dir, summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
