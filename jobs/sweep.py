"""Job: the sweep stage.

python -m jobs.sweep configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.sweep configs/quickstart.yaml
"""

from jobs._entry import job_main

if __name__ == "__main__":
    job_main("sweep")
