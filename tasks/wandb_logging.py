"""Optional W&B logging of the training tasks through the flytekit plugin (flytekitplugins-wandb).

Configured by environment variables read when `tasks/train.py` is imported, because the plugin's
`wandb_init` fixes project and entity when it decorates the task:

- `MMCURATE_WANDB_PROJECT`: enables it (unset or empty: the tasks are plain, this module is never imported).
- `MMCURATE_WANDB_ENTITY`: the W&B user or team (required with a project: the plugin needs it).
- `MMCURATE_WANDB_SECRET_GROUP` (default `wandb`) and `MMCURATE_WANDB_SECRET_KEY` (default `wandb-api-key`):
  the Flyte secret that holds the W&B API key (on Kubernetes: the Secret `group` in the execution's
  namespace, its entry `key`); flytekit requires a group at registration; the task requests it, and on a cluster the plugin reads it
  and calls `wandb.login` before `wandb.init`. Locally the plugin only calls `wandb.init` (use
  `WANDB_MODE=offline` or `wandb login`).

The same variables are set in the decorated task's container environment, so the pod that imports
`tasks/train.py` to run the task builds the same decorated task as the machine that registered it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import wandb
from flytekit import Secret
from flytekit.core.context_manager import FlyteContextManager
from flytekitplugins.wandb import wandb_init

# The variables (tasks/train.py reads them: WANDB_ENV_VARS, WANDB_ENV).
PROJECT, ENTITY = "MMCURATE_WANDB_PROJECT", "MMCURATE_WANDB_ENTITY"
SECRET_KEY, SECRET_GROUP = "MMCURATE_WANDB_SECRET_KEY", "MMCURATE_WANDB_SECRET_GROUP"
DEFAULT_SECRET_GROUP, DEFAULT_SECRET_KEY = "wandb", "wandb-api-key"


class RankZeroWandbInit(wandb_init):
    """`wandb_init` that starts the W&B run on global rank 0 only, and treats a local torch-elastic worker as local.

    - Under torch elastic every rank runs the task body (so every rank runs this decorator); the training
      loop logs from rank 0 only, and one run per task is what the task's W&B link points at. Other ranks
      run the body as is.
    - flytekitplugins-kfpytorch runs the body in worker processes under a task-execution context even for a
      local run (`spawn_helper` -> `setup_execution`, with no execution id), where the plugin would read the
      Flyte secret and `wandb.login`; such a worker gets the plugin's local behaviour instead: `wandb.init`,
      the body, `wandb.finish`.
    """

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if int(os.environ.get("RANK", "0")) != 0:
            return self.task_function(*args, **kwargs)
        if not _local_run_in_elastic_worker():
            return super().execute(*args, **kwargs)
        wandb.init(project=self.project, entity=self.entity, id=self.id, **self.init_kwargs)
        try:
            return self.task_function(*args, **kwargs)
        finally:
            wandb.finish()


def _local_run_in_elastic_worker() -> bool:
    """True in a process that flytekit thinks is a task execution but that has no Flyte execution id."""
    ctx = FlyteContextManager.current_context()
    state = ctx.execution_state
    if state is None or state.is_local_execution():
        return False
    return not state.user_space_params.execution_id.name


def wandb_task_options(env: Mapping[str, str]) -> tuple[Callable[[Callable], Callable], dict[str, Any]]:
    """(decorator for the task function, extra `@task` arguments) for W&B logging configured by `env`, the
    set MMCURATE_WANDB_* variables; the extra arguments request the secret and pass `env` on to the pod."""
    if not env.get(ENTITY):
        raise ValueError(f"{PROJECT} is set but {ENTITY} is not: the W&B plugin needs both (tasks/wandb_logging.py)")
    secret = Secret(key=env.get(SECRET_KEY, DEFAULT_SECRET_KEY), group=env.get(SECRET_GROUP, DEFAULT_SECRET_GROUP))
    # resume="allow": a torch-elastic restart in the same pod re-inits the same run id (the pod name on a
    # cluster) and continues that run instead of failing on it.
    decorator = RankZeroWandbInit(project=env[PROJECT], entity=env[ENTITY], secret=secret, resume="allow")
    return decorator, {"secret_requests": [secret], "environment": dict(env)}
