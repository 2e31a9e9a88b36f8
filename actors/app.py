"""The Ray Serve application: ``mars_ray.actors.app:build_app`` (the import path that
``serve run``, ``serveConfigV2`` and ``mars-ray serve`` use).

``build_app(args)`` validates ``args`` (:func:`~mars_ray.actors.config.deployment_config`;
a bad key or value raises ConfigError naming it) and returns the bound ingress. It
starts nothing: the ingress replica creates or finds the runtime's actors when it
starts (:func:`mars_ray.cluster.launch.ensure_runtime`).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from .config import DeploymentConfig, deployment_config


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The mars-ray Serve application for ``args`` (DeploymentConfig fields, plus
    ``policy_config_path``)."""
    config = deployment_config(dict(args or {}))
    return bind(config)


def bind(config: DeploymentConfig) -> serve.Application:
    from .ingress import Ingress

    # @serve.deployment turned the class into a Deployment (which has .options/.bind).
    deployment = Ingress.options(num_replicas=config.ingress_replicas)  # type: ignore[attr-defined]
    return deployment.bind(config.model_dump(mode="json"))
