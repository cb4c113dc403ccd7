"""Prefect flows composing the tasks: `collect-and-train` (the main job), `collect`, `train`.

python -m flows.demo        # the whole job on the embedded default, ephemeral Prefect API
"""
