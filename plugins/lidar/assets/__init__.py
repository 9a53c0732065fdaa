"""The lidar plugin's shipped checkpoints and data (package data; a package so that setuptools ships it quietly)."""
