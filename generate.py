#!/usr/bin/env python
"""txt2img with A1111 prompt semantics, embeddings and hypernetworks (SPEC §6). Not implemented yet."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args(argv)
    print("generate.py: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
