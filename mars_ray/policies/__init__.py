"""The policy core: pure, synchronous, shared by the simulator, Ray actors and vLLM.

No Ray, asyncio, torch or vLLM may be imported from this package.
"""

from mars_ray.policies.base import (
    AdmissionDecision,
    AdmissionPolicy,
    ClusterSignals,
    EngineLoad,
    PlacementPolicy,
    Pressure,
    RetentionAction,
    RetentionDecision,
    RetentionPolicy,
    SchedulableRequest,
    SchedulerPolicy,
    SessionTicket,
    TurnEndContext,
    WaitingQueue,
)
from mars_ray.policies.registry import POLICIES, PolicyConfig, PolicySpec, get_policy

__all__ = [
    "POLICIES",
    "AdmissionDecision",
    "AdmissionPolicy",
    "ClusterSignals",
    "EngineLoad",
    "PlacementPolicy",
    "PolicyConfig",
    "PolicySpec",
    "Pressure",
    "RetentionAction",
    "RetentionDecision",
    "RetentionPolicy",
    "SchedulableRequest",
    "SchedulerPolicy",
    "SessionTicket",
    "TurnEndContext",
    "WaitingQueue",
    "get_policy",
]
