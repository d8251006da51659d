"""corral.router: the routing policy core (pure Python, no Ray/kopf) and the router service."""
