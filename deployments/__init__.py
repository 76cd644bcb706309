"""The gateway's Prefect deployments: one definition (catalog.py) for `satset serve` (serve.py) and prefect.yaml
(prefect_yaml.py, which generates the file and checks it against the catalog)."""

from __future__ import annotations

from deployments.catalog import DEPLOYMENT_NAME, DEPLOYMENTS, Concurrency, GatewayDeployment, available_deployments

__all__ = ["DEPLOYMENTS", "DEPLOYMENT_NAME", "Concurrency", "GatewayDeployment", "available_deployments"]
