"""Model definitions (plain nn.Modules), the architecture registry and weight loaders."""
