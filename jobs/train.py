"""Job: the train stage.

python -m jobs.train configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.train configs/quickstart.yaml
"""

from ray_pipeline.cli import job

if __name__ == "__main__":
    job("train")
