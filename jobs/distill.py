"""Job: the whole loop (generate, curate, train, sweep, evaluate, serve).

python -m jobs.distill configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.distill configs/quickstart.yaml
"""

from jobs._entry import job_main

if __name__ == "__main__":
    job_main("distill")
