"""The `stagewise` command, for use by hand: inspect artefacts, edit planned stages."""

import argparse
import logging
import sys
from pathlib import Path

import yaml

from .artefacts import UnknownArtefact, describe
from .config import fill_stage_defaults, schema_error
from .training.checkpoints import append_stage, load

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


def _ls(args):
    print(describe(args.path))


def _stage_settings(path):
    """The stage settings in YAML file `path`, checked against the config schema's stage."""
    try:
        settings = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read stage settings ({err})") from None
    schema = yaml.safe_load(SCHEMA.read_text())
    error = schema_error(settings, {**schema["$defs"]["stage"], "$defs": schema["$defs"]})
    if error is not None:
        raise ValueError(f"{path}: stage setting {error}")
    fill_stage_defaults(settings, schema)
    return settings


def _append_stage(args):
    name = append_stage(args.checkpoint, _stage_settings(args.stage_settings), args.out, args.replace)
    print(f"{args.out}: {name} planned; `stagewise plan {args.out}` prints the stages as a config override")


def _plan(args):
    state = load(args.checkpoint)
    print(yaml.safe_dump({"training": state["planned_stages"]}, sort_keys=False).rstrip())


def parser():
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
    return main


def main(argv=None):
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
