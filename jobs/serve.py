"""Job: the serve stage.

python -m jobs.serve configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.serve configs/quickstart.yaml
"""

from ray_pipeline.cli import job

if __name__ == "__main__":
    job("serve")
