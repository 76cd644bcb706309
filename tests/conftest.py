"""Shared fixtures come from tests/plugins/: each real part (PACS, simulator, Prefect, the wired gateway) has its
own module. Prefect keeps its database, results and caches in a temporary home for the session."""

import atexit
import os
import shutil
import tempfile

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="satset-test-prefect-")  # never a real ~/.prefect
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "true")

pytest_plugins = ["tests.plugins.pacs", "tests.plugins.simulator", "tests.plugins.prefect", "tests.plugins.gateway"]
