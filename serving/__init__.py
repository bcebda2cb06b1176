"""Ray Serve application: a Router ingress (gate, streaming budget controller, P_n, byte
accounting) and one autoscaled deployment per expert (DESIGN.md section 4)."""
