"""Fixtures of the container tests; the plumbing (and helpers the tests import) is container_harness.py."""

from tests.container.container_harness import base_image, image, podman

__all__ = ["base_image", "image", "podman"]
