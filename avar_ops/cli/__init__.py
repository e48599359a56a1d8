"""The `avar` command: VAS measurement, generation with the intervention, α sweeps, the demo, and benchmark
evaluation with the VAS-accuracy correlation, and reports of learned steering files.

    avar vas      --model DIR --data FILE.jsonl --limit 200 --out DIR [--compare DIR2 ...]
    avar generate --model DIR --image PATH --question "..." [--alpha-img 0.15 --alpha-sys 0.2 --mode weights]
    avar sweep    --model DIR --data FILE.jsonl --alphas 0 0.15 0.15:0.2 0.3:0.4 --out DIR
    avar demo     [--out DIR]
    avar eval     --model DIR --bench mathvista=PATH mmstar=PATH ... [--limit N] --out RUN
    avar correlate RUN1 RUN2 RUN3 ... --out DIR
    avar steer-report FILE [--out DIR]

--model is "tiny" (the default: a tiny random Qwen2.5-VL with an offline processor, for trying things out) or a
local checkpoint directory (e.g. Qwen2.5-VL-7B-Instruct), loaded with local_files_only=True.

Arguments, the output folder, the data and its images are checked before the model loads; a problem is one line
on stderr and exit status 2 (the command line: values, flags, paths) or 1 (the content of a file it names).

One module per command (`vas`, `generate`, `sweep`, `demo`, `eval` with `correlate`, `steer_report`), each
adding its parser and its `run`; the argument groups they share are in `args`, the model in `loading`, the output
folder policy in `out`, the errors in `errors`.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional, Sequence

from avar_ops.cli import demo, eval, generate, steer_report, sweep, vas
from avar_ops.cli.args import MAX_NEW_TOKENS, check_counts
from avar_ops.cli.errors import CLIError, DataError, Interrupted, one_line

__all__ = ["main", "build_parser", "CLIError", "DataError", "MAX_NEW_TOKENS"]


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage text stays behind --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# A negative IMG:SYS pair ("-0.5:0.2") starts like an option; argparse only takes plain negative numbers as values.
_NEGATIVE_PAIR = re.compile(r"^-[0-9.][0-9.eE+-]*:[0-9.eE+-]*$")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="avar", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{vas,generate,sweep,demo,eval,correlate,steer-report}")
    sub.required = True
    for command in (vas, generate, sweep, demo, eval, steer_report):
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # A leading space makes argparse read the pair as a value; the sweep's parser strips it.
    argv = [" " + a if _NEGATIVE_PAIR.match(a) else a for a in argv]
    args = parser.parse_args(argv)
    try:
        check_counts(args)
        return args.run_command(args)
    except Interrupted as exc:
        print(f"avar {args.command}: {one_line(exc)}", file=sys.stderr)
        return exc.code
    except CLIError as exc:
        print(f"avar {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"avar {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        # What the checks before loading cannot see (e.g. a sample the model cannot measure): still one line.
        print(f"avar {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
