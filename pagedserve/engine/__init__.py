"""Engine: core loop, clients, input/output processing, offline LLM."""
