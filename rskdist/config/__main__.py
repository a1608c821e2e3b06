"""python -m rskdist.config [--markdown | CONFIG [key=value ...]]: print the reference or a resolved config."""

import sys

import yaml

from rskdist.config import load_config, markdown_reference, to_dict

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--markdown"]:
        print(markdown_reference())
    else:
        try:
            cfg = load_config(args[0] if args else None, args[1:])
        except ValueError as exc:
            sys.exit(f"error: {exc}")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
