"""The arguments of the Serve application (``serve_apps.router:app``): the run config's own
sections, resolved for serving, so every setting keeps its one definition in config.py.

The serve stage builds them from a run (``serving.stage.app_args``); ``distill serve build``
writes them into a Serve config file, where ``serve deploy`` or a KubeRay RayService passes
them to the app builder, which validates them again with this model.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ray_pipeline.config import ServeSection, TaskSection, TeacherSection


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serve: ServeSection = Field(
        description="The run's serve section, resolved: student GPUs, seed and request log "
        "folder filled in."
    )
    task: TaskSection = Field(description="The task (its prompt inline): answer format checks.")
    teacher: TeacherSection = Field(description="The teacher: model, timeouts, retries, quota.")
    teacher_base_url: str = Field(description="The teacher endpoint the proxy calls.")
    teacher_api_key_env: str | None = Field(
        description="Environment variable of the replicas holding the teacher's key (None: "
        "the endpoint needs none, e.g. the simulator)."
    )
    students: dict[str, str] = Field(description="Student name -> checkpoint directory.")
    drift_reference: str | None = Field(
        None, description="JSON summary of the training inputs (serving.drift.reference)."
    )

    @model_validator(mode="after")
    def _students_resolved(self) -> AppArgs:
        if set(self.students) != set(self.serve.students):
            raise ValueError(
                f"students {sorted(self.students)} must be the serve section's "
                f"{sorted(self.serve.students)}, each with its checkpoint"
            )
        if self.serve.request_log.enabled and self.serve.request_log.dir is None:
            raise ValueError("serve.request_log.dir must be resolved to a folder")
        if self.serve.student.num_gpus is None:
            raise ValueError("serve.student.num_gpus must be resolved to a number")
        return self


# Ray Serve's throughput-optimized mode (ray/serve/_private/constants.py), read by each replica
# process when it imports Serve: so it is in the app's runtime_env, which Serve merges into
# every deployment's (a deployment's own runtime_env set in code would replace the app's
# env_vars, secrets included, on the replica: measured on Ray 2.60).
THROUGHPUT_OPTIMIZED_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Direct ingress lets HAProxy call the ingress replicas' own ports; behind Serve's proxy
    # nothing does, and a stopping router would wait 30 s for load balancers to let go.
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    # User code keeps its own thread (Serve's default; the mode turns it off): a student's
    # batch holds it for milliseconds to seconds and must not block the replica's loop.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
}


def app_runtime_env(serve: ServeSection) -> dict[str, dict[str, str]]:
    """The app's runtime_env (``serve.throughput_optimized``): an operator adds their own
    env_vars beside these in the Serve config file."""
    return {"env_vars": dict(THROUGHPUT_OPTIMIZED_ENV)} if serve.throughput_optimized else {}
