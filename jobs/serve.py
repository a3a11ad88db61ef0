r"""Job: the serve stage.

python -m jobs.serve configs/quickstart.yaml
ray job submit --address http://127.0.0.1:8265 --working-dir . \
    --runtime-env-json '{"env_vars": {"DISTILL_STORAGE_ROOT": "/mnt/shared"}}' \
    -- python -m jobs.serve configs/quickstart.yaml
distill submit configs/quickstart.yaml --address http://127.0.0.1:8265 --job serve

Outputs go under DISTILL_STORAGE_ROOT (a relative run.output_dir is refused in a job
without it); the last log line names the report.
"""

from ray_pipeline.cli import job

if __name__ == "__main__":
    job("serve")
