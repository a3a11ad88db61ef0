"""Job: the whole loop (generate, curate, train, sweep, evaluate, serve): `distill run`.

python -m jobs.distill configs/quickstart.yaml
ray job submit --working-dir . -- python -m jobs.distill configs/quickstart.yaml
"""

from ray_pipeline.cli import job

if __name__ == "__main__":
    job("run")
