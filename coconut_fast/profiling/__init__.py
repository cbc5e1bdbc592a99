"""What an engine step costs, measured on any machine: launches, bytes against the floor, host time."""
from .launches import LaunchCounter, counting_triton_launches
from .step import SHAPES, profile_step

__all__ = ["LaunchCounter", "counting_triton_launches", "SHAPES", "profile_step"]
