"""Model versions in MLflow: signed manifests, aliases, lineage and the release ledger."""
