"""Running the model: native kernels, backends, the memory planner, the session from a request to a ready model, the generate loop."""
