"""Frontend: torch model -> IR of generic ops (torch.export, module converters, model specs)."""
