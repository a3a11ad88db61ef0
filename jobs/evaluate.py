"""Job: the evaluate stage.

python -m jobs.evaluate configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.evaluate configs/quickstart.yaml
"""

from ray_pipeline.cli import job

if __name__ == "__main__":
    job("evaluate")
