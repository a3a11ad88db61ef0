"""Job: the curate stage.

python -m jobs.curate configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.curate configs/quickstart.yaml
"""

from jobs._entry import job_main

if __name__ == "__main__":
    job_main("curate")
