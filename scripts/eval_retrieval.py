"""``python scripts/eval_retrieval.py ARGS`` is ``cmgen eval retrieval ARGS`` (see evaluation/retrieval_cli.py).

    python scripts/eval_retrieval.py --benchmark msrvtt-1ka --data-root data/msrvtt --sims sims.npy --out res/1ka.json
"""
import sys

from cmgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "retrieval", *sys.argv[1:]]))
