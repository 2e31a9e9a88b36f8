"""Names of the runtime's detached actors (in the ``mars`` Ray namespace), so that any
ingress replica, a restarted scheduler or a fault injector finds them."""

NAMESPACE = "mars"
SCHEDULER_ACTOR_NAME = "mars-global-scheduler"
PG_NAME = "mars-gpu-workers"


def worker_name(engine_id: int) -> str:
    return f"mars-gpu-worker-{engine_id}"


def executor_name(node_index: int) -> str:
    return f"mars-tool-executor-{node_index}"
