"""Job: the curate stage.

python -m jobs.curate configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.curate configs/quickstart.yaml
"""

from ray_pipeline.cli import job

if __name__ == "__main__":
    job("curate")
