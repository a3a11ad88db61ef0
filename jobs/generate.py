"""Job: the generate stage.

python -m jobs.generate configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.generate configs/quickstart.yaml
"""

from jobs._entry import job_main

if __name__ == "__main__":
    job_main("generate")
