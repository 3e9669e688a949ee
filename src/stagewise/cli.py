"""The `stagewise` command, for use by hand: inspect artefacts, edit planned stages."""

import argparse
import logging
import sys
from collections.abc import Sequence

import yaml

from .artefacts import UnknownArtefact, describe
from .config import stage_from_file
from .training.checkpoints import append_stage, convert, load


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _ls(args: argparse.Namespace) -> None:
    print(describe(args.path))


def _append_stage(args: argparse.Namespace) -> None:
    name = append_stage(args.checkpoint, stage_from_file(args.stage_settings), args.out, args.replace)
    print(f"{args.out}: {name} planned; `stagewise plan {args.out}` prints the stages as a config override")


def _plan(args: argparse.Namespace) -> None:
    state = load(args.checkpoint)
    print(yaml.safe_dump({"training": state["planned_stages"]}, sort_keys=False).rstrip())


def _convert(args: argparse.Namespace) -> None:
    convert(args.old, args.new)
    print(f"{args.new}: written in the safe format")


def _infer(args: argparse.Namespace) -> None:
    from .infer import InferenceSettings, infer

    if args.effective_samples is not None and args.max_samples < args.num_samples:
        raise ValueError(f"--max-samples {args.max_samples} is below --num-samples {args.num_samples}")
    settings = InferenceSettings(args.num_samples, not args.no_importance_sampling, args.events_per_batch,
                                 args.num_plot_events, effective_samples=args.effective_samples,
                                 max_samples=args.max_samples)
    count = infer(args.model, args.events, args.out, settings, args.device)
    print(f"{args.out}: posterior.h5 and summary.csv of {count} events")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="stagewise", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="print an artefact's settings, progress, provenance and diagnostics")
    ls.add_argument("path", help="a .pt model or checkpoint, trafo.h5, svd_<det>.h5, counts.yaml, "
                                 "an event file or an ASD file")
    ls.set_defaults(run=_ls)
    append = commands.add_parser("append-stage", help="plan a new stage in a copy of a checkpoint")
    append.add_argument("--checkpoint", required=True, help="checkpoint or stage model to edit")
    append.add_argument("--stage-settings", required=True, help="YAML file with one stage's settings")
    append.add_argument("--out", required=True, help="where to write the edited copy")
    append.add_argument("--replace", type=int, metavar="N", help="replace the planned stage_N instead of appending")
    append.set_defaults(run=_append_stage)
    plan = commands.add_parser("plan", help="print a checkpoint's planned stages as a config override")
    plan.add_argument("checkpoint")
    plan.set_defaults(run=_plan)
    conv = commands.add_parser("convert", help="rewrite a checkpoint or .pt model of an earlier version (numpy "
                                               "arrays inside) in the safe format; runs nothing from the file")
    conv.add_argument("old", metavar="OLD")
    conv.add_argument("new", metavar="NEW", help="where to write the converted file (may be OLD)")
    conv.set_defaults(run=_convert)
    inf = commands.add_parser("infer", help="posteriors (or predictions) of observed events from one stage model file")
    inf.add_argument("model", help="a stage model: model_stage_<k>.pt, or .keras for gaussian_regression")
    inf.add_argument("events", nargs="+", help="observed-data files (layout observed/1)")
    inf.add_argument("--out", required=True, help="folder for posterior.h5, summary.csv and corner.png")
    inf.add_argument("--num-samples", type=_positive, default=2000, help="posterior samples per event (2000)")
    inf.add_argument("--effective-samples", type=_positive, default=None,
                     help="importance sampling draws batches of --num-samples until this effective number per event "
                          "(default: one batch)")
    inf.add_argument("--max-samples", type=_positive, default=10000,
                     help="... or until this many are drawn (10000)")
    inf.add_argument("--no-importance-sampling", action="store_true", help="the network's samples only")
    inf.add_argument("--events-per-batch", type=_positive, default=64, help="events read at a time (64)")
    inf.add_argument("--num-plot-events", type=_positive, default=3, help="corner plots of the first events (3)")
    inf.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (cpu)")
    inf.set_defaults(run=_infer)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (UnknownArtefact, ValueError, OSError) as err:
        print(f"stagewise {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
