"""Job: the generate stage.

python -m jobs.generate configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.generate configs/quickstart.yaml
"""

from ray_pipeline.cli import job

if __name__ == "__main__":
    job("generate")
