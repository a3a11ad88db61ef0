"""Job: the train stage.

python -m jobs.train configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.train configs/quickstart.yaml
"""

from jobs._entry import job_main

if __name__ == "__main__":
    job_main("train")
