"""The ``kdexp`` command: ``kdexp train [overrides]`` and ``kdexp demo``."""

from __future__ import annotations

import argparse
import sys

USAGE = """kdexp <command> [args]

commands:
  train [hydra overrides]   run one experiment (same as python -m kdexp.train; try --help)
  demo  [hydra overrides]   teacher → Hinton-KD student and CE-only student on MNIST-1D, with a summary
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kdexp", usage=USAGE, add_help=False)
    parser.add_argument("command", nargs="?")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command is None or (args.help and args.command is None):
        print(USAGE)
        return 0
    if args.command == "train":
        from kdexp import train

        sys.argv = ["kdexp train", *rest]
        train.main()
        return 0
    if args.command == "demo":
        from kdexp import demo

        return demo.main(rest)
    print(f"kdexp: unknown command '{args.command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
