"""Layer 5, the application: verify and the parity harness, the CLI and its shared plumbing, the server (serving/), the
genai builder driver."""
