"""Job: the sweep stage.

python -m jobs.sweep configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.sweep configs/quickstart.yaml
"""

from ray_pipeline.cli import job

if __name__ == "__main__":
    job("sweep")
