"""The `sparsity-ext` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsity-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what is built and which backend each op runs on")
    args = parser.parse_args(argv)
    if args.command == "info":
        import sparsity_ext
        print(sparsity_ext.info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
