"""etcd-compute: Placement decides where, etcd carries what, libvirt does it."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="etcd-compute",
    version="0.2.0",
    description="A lean VM control plane: OpenStack Placement + etcd + libvirt",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["etcd_compute", "etcd_compute.*", "md_server", "md_server.*"]),
    install_requires=[
        "etcd3==0.12.0",
        # etcd3 0.12's generated code fails with protobuf >= 4 ("Descriptors cannot be created directly").
        "protobuf<=3.20.3",
        "requests>=2.25",
        "urllib3>=1.26",  # placement.py bounds whole requests with its connection classes
        "psutil>=5.8",
        "libvirt-python>=9.0",
        "PyYAML>=6.0",
        "click>=8.1",
        # Builds the NoCloud config drive (ISO 9660) in Python; pure Python, no C parts.
        "pycdlib>=1.14",
        # The API server and dashboard (etcd_compute/api): the OpenAPI document comes from the routes,
        # form posts need python-multipart, pages are Jinja2 templates, live lists server-sent events.
        "fastapi>=0.115",
        "uvicorn>=0.30",
        "jinja2>=3.1",
        "python-multipart>=0.0.9",
        "sse-starlette>=2.1",
        # /metrics of ecompute, md_server and the API server, in Prometheus' text format.
        "prometheus-client>=0.20",
        "typing-extensions>=4.6",  # contract.py's TypedDicts, which the OpenAPI document describes
    ],
    # The checks .ci/run makes: tests, lint, types and import contracts (pyproject.toml).
    extras_require={"test": ["pytest>=7", "ruff>=0.6", "mypy>=1.10", "import-linter>=2.0", "types-PyYAML",
                             "types-requests", "types-psutil",
                             "hypothesis>=6.100",  # tests/test_properties.py
                                # the dashboard's tests drive Debian's chromium through chromium-driver
                                "selenium>=4.20", "openapi-spec-validator>=0.7",
                                # docker/: the compose file's profiles (Debian's 1.0.3 has none), its smoke tests
                                "podman-compose>=1.1", "gabbi>=4"],
                    # bench/ draws its pictures (README's Performance section) with it
                    "bench": ["matplotlib>=3.8"]},
    package_data={"etcd_compute": ["units/*.service", "api/templates/*.html", "api/static/*"]},
    entry_points={
        "console_scripts": [
            "eschedule=etcd_compute.eschedule.cli:main",
            "ecompute=etcd_compute.ecompute:main",
            "eapi=etcd_compute.api.server:main",
        ],
    },
)
