"""Live traffic: the model service, its request store and record worker, and Envoy's routes."""
