"""corral.api: pydantic models of the CRDs (single source of truth), CRD generator, the corral CLI."""
