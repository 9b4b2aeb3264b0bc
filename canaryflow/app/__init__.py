"""The application layer: the CLI, the demo, terminal summaries and approvals.

The only part of `canaryflow/` that may import Prefect or `flows/`: everything below it is a
library that runs the same from a flow, a test or a script.
"""
