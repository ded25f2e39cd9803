"""Which packages datus-queue installs, and under which names (the rest is in pyproject.toml).

The repository keeps the job system in top-level folders (``tasks/``, ``workers/``,
``scheduler/``); installed they are ``datus_queue.tasks`` etc., so they never shadow a user's
own ``tasks`` module. The model layer is installed into the ``datus`` namespace: only
``datus.models``, ``datus.testing`` and ``datus.mcp_servers``, none of which collides with a
Datus-agent file outside the model layer (``datus/__init__.py`` and Datus's shared modules are
not part of this distribution; see ``standalone/``).
"""

from setuptools import find_namespace_packages, find_packages, setup

JOB_SYSTEM = ("tasks", "workers", "scheduler")

packages = ["datus_queue"]
package_dir = {}
for folder in JOB_SYSTEM:
    for name in [folder, *(f"{folder}.{sub}" for sub in find_packages(folder))]:
        packages.append(f"datus_queue.{name}")
    package_dir[f"datus_queue.{folder}"] = folder
packages += find_namespace_packages(include=["datus.models*", "datus.testing*", "datus.mcp_servers*"],
                                    exclude=["*.__pycache__"])

setup(packages=packages, package_dir=package_dir)
