"""Core: config, the registry type, output kinds, tasks and metrics, errors, atomic writes, runtime, distributed."""
