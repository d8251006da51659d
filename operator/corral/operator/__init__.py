"""corral.operator: kopf handlers and pure CR -> Ray Serve translation (later issue)."""
