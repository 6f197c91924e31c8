"""Ray job entrypoints: thin wrappers over `pipeline.cli`, one module per task.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.label --config jobs/configs/label_reviews_8b.yaml

Inside a job RAY_ADDRESS points at the cluster, so the pipeline joins it instead of starting
a local Ray. Flags after --config override the file (e.g. `--replicas 4,32`).
"""
