"""`eqx-models train` as a script: `python scripts/train.py --config examples/stdlib-gpt-neo.toml`.

Every flag of `eqx-models train --help` works here too.
"""

import sys

from eqx_models.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
